"""Dialog widgets: field parameters that default to the field whose name fits, never to the layer's first field.

QGIS's field combo box selects the first field of the layer (usually ``fid``) for a parameter without a default,
so every dialog opened with ``fid`` as the treatment and the outcome, and Run failed. Here a field parameter
names the words its field is usually called by (treatment: treated, treatment, treat ...); the dialog selects
the first field of the chosen layer that fits and otherwise shows nothing, so the user has to choose. Only the
dialogs use this (the standard, batch and model dialogs); ``processing.run`` and ``qgis_process`` are unchanged.
"""

import re

#: Field names that fit each role, in order of preference (compared without case).
ROLE_NAMES = {
    "treatment": ("treated", "treatment", "treat", "w", "d"),
    "outcome": ("outcome", "y"),
    "unit": ("unit", "unit_id", "id", "uid"),
    "time": ("year", "time", "period", "date", "t"),
}
#: Fields GeoCATE writes itself (a result layer used as the next run's input): never covariates.
OWN_FIELDS = re.compile(r"^(cate(_(lo|hi|se|raw))?|group|p_\d+|patch_ok|cluster)$", re.IGNORECASE)
#: Fields named like a simulated truth or an identifier: a warning when chosen as covariates.
SUSPECT_FIELDS = re.compile(r"^(true_.*|.*_id|id|fid)$", re.IGNORECASE)


def guess_field(names, role):
    """The field of ``names`` that fits ``role`` (a key of ROLE_NAMES), or '' when none does."""
    wanted = ROLE_NAMES.get(role, ())
    lowered = {name.lower(): name for name in names}
    for word in wanted:                                  # an exact name first
        if word in lowered:
            return lowered[word]
    for word in wanted:                                  # then a name that starts with one: treated_2019
        if len(word) < 3:
            continue
        for name in names:
            if re.match(rf"{re.escape(word)}([_ ]|$)", name, re.IGNORECASE):
                return name
    return ""


def field_role(definition, role):
    """Give field parameter ``definition`` a dialog widget that selects the field fitting ``role``."""
    definition.setMetadata(dict(definition.metadata(), widget_wrapper={
        "class": f"{__package__}.widgets.GuessFieldWrapper", "role": role}))
    return definition


try:
    from processing.gui.wrappers import DIALOG_MODELER, TableFieldWidgetWrapper
except ImportError:  # no Processing GUI (e.g. a bare qgis_process without it): the widget is never built
    TableFieldWidgetWrapper, DIALOG_MODELER = object, None


class GuessFieldWrapper(TableFieldWidgetWrapper):
    """A field combo box that starts on the field fitting its role, or on nothing."""

    def __init__(self, param, dialog, row=0, col=0, role="", **kwargs):
        self.role = role
        super().__init__(param, dialog, row, col, **kwargs)

    def refreshItems(self):  # noqa: N802 - Processing's name
        definition = self.parameterDefinition()
        if definition.allowMultiple() or self.dialogType == DIALOG_MODELER:
            return super().refreshItems()
        self.widget.setAllowEmptyFieldName(True)
        self.widget.setLayer(self._layer)
        self.widget.setField(guess_field(self.getFields(), self.role) if self._layer is not None else "")
        return None

    def value(self):
        if self.dialogType != DIALOG_MODELER and not self.parameterDefinition().allowMultiple():
            return self.widget.currentField() or None   # nothing chosen: the dialog asks for the field
        return super().value()
