"""Installing the missing estimation packages into the folder the plugin manages, as a background task."""

import subprocess

from qgis.core import QgsTask

from ..provider.collector import held_off_main_thread
from .dependencies import install_commands


class InstallTask(QgsTask):
    def __init__(self, missing):
        super().__init__("GeoCATE: installing Python packages", QgsTask.CanCancel)
        self.commands = install_commands(missing)
        self.error = ""

    def run(self):
        with held_off_main_thread():   # no cycle collection in this thread (provider/collector.py)
            return all(self.run_one(command) for command in self.commands)

    def run_one(self, command):
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            self.error = f"could not start {command[0]} ({exc})"
            return False
        output = []
        for line in process.stdout:
            output.append(line)
            if self.isCanceled():
                process.terminate()
                self.error = "cancelled"
                return False
        if process.wait() != 0:
            self.error = "pip said: " + "".join(output[-5:]).strip()
            return False
        return True
