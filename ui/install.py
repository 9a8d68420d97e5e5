"""Installing the missing estimation packages into the folder the plugin manages, as a background task."""

import subprocess

from qgis.core import QgsTask

from .dependencies import install_command


class InstallTask(QgsTask):
    def __init__(self, missing):
        super().__init__("GeoCATE: installing Python packages", QgsTask.CanCancel)
        self.command = install_command(missing)
        self.error = ""

    def run(self):
        try:
            process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            self.error = f"could not start {self.command[0]} ({exc})"
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
