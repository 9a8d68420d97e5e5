"""The two edges of the flow: QGIS features -> core arrays, and core results -> output features."""

import math

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessingException,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

# Fields every per-unit output appends (ARCHITECTURE.md, "Contracts").
RESULT_FIELDS = (
    ("cate", QVariant.Double),
    ("cate_lo", QVariant.Double),
    ("cate_hi", QVariant.Double),
    ("cate_se", QVariant.Double),
    ("group", QVariant.Int),
    ("patch_ok", QVariant.Int),
)


def as_number(value):
    """A feature attribute as float; NULL and empty -> nan."""
    if value is None:
        return math.nan
    if isinstance(value, QVariant):  # QGIS's NULL
        return math.nan if value.isNull() else float(value.value())
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def as_label(value):
    """A feature attribute as a cluster label (text); NULL and empty -> None."""
    if value is None or (isinstance(value, QVariant) and value.isNull()):
        return None
    text = str(value)
    return text if text.strip() and text != "NULL" else None


def check_numeric_field(fields, name, role):
    index = fields.lookupField(name)
    if index < 0:
        raise QgsProcessingException(
            f"The {role} field '{name}' does not exist in the units layer. Choose one of its fields.")
    field = fields.at(index)
    if not field.isNumeric():
        raise QgsProcessingException(
            f"The {role} field '{name}' is of type {field.typeName()}, not a number. "
            f"Choose a numeric field, or convert it first (Field Calculator: to_int(\"{name}\") or to_real(\"{name}\")).")


def unit_point(geometry):
    """(x, y) of a unit: the point itself, or the centroid of a polygon; nan for no geometry."""
    if geometry is None or geometry.isNull() or geometry.isEmpty():
        return math.nan, math.nan
    if geometry.type() != QgsWkbTypes.PointGeometry or geometry.isMultipart():
        geometry = geometry.centroid()
    point = geometry.asPoint()
    return point.x(), point.y()


def read_units(source, treatment, outcome, covariates, feedback=None, cluster=None, strata=None, propensity=None):
    """Read a feature source into (features, UnitTable); features keep the input's order.

    cluster: an optional field of cluster ids (e.g. village), any type; NULL -> None. strata: an optional field of
    the blocks a trial was randomized in, any type; propensity: an optional numeric field of known assignment
    probabilities."""
    from ..core.study import UnitTable

    fields = source.fields()
    check_numeric_field(fields, treatment, "treatment")
    check_numeric_field(fields, outcome, "outcome")
    for name in covariates:
        check_numeric_field(fields, name, "covariate")
    if propensity:
        check_numeric_field(fields, propensity, "assignment probability")
    if strata and fields.lookupField(strata) < 0:
        raise QgsProcessingException(f"The strata field '{strata}' does not exist in the units layer.")
    if cluster and fields.lookupField(cluster) < 0:
        raise QgsProcessingException(f"The cluster field '{cluster}' does not exist in the units layer. "
                                     "Choose one of its fields, or none.")
    labels = []
    crs = source.sourceCrs()
    crs_wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) if crs.isValid() else ""
    features, xy, treated, outcomes, covs, blocks, probabilities = [], [], [], [], [], [], []
    total = max(source.featureCount(), 1)
    for i, feature in enumerate(source.getFeatures()):
        if feedback is not None and feedback.isCanceled():
            raise QgsProcessingException("The run was cancelled while reading the units. Nothing was written.")
        features.append(QgsFeature(feature))
        xy.append(unit_point(feature.geometry()))
        treated.append(as_number(feature[treatment]))
        outcomes.append(as_number(feature[outcome]))
        covs.append([as_number(feature[name]) for name in covariates])
        if cluster:
            labels.append(as_label(feature[cluster]))
        if strata:
            blocks.append(as_label(feature[strata]))
        if propensity:
            probabilities.append(as_number(feature[propensity]))
        if feedback is not None and i % 500 == 0:
            feedback.setProgress(100.0 * i / total * 0.05)
    n = len(features)
    table = UnitTable(
        xy=np.asarray(xy, dtype=float).reshape(n, 2), crs_wkt=crs_wkt,
        treated=np.asarray(treated, dtype=float), outcome=np.asarray(outcomes, dtype=float),
        covariates=np.asarray(covs, dtype=float).reshape(n, len(covariates)),
        covariate_names=tuple(covariates), treatment_name=treatment, outcome_name=outcome,
        clusters=labels if cluster else None, strata=blocks if strata else None,
        propensity=np.asarray(probabilities, dtype=float) if propensity else None,
    )
    return features, table


def output_fields(input_fields, extra=RESULT_FIELDS):
    """The input's fields, less any named like a result field (a rerun replaces them), plus the result fields."""
    names = {name for name, _ in extra}
    fields = QgsFields()
    kept = []
    for index, field in enumerate(input_fields):
        if field.name().lower() in names:
            continue
        fields.append(field)
        kept.append(index)
    for name, kind in extra:
        fields.append(QgsField(name, kind))
    return fields, kept


def _value(number, kind):
    """A float from a result column as an attribute: nan and None -> NULL (None), ints as int."""
    if number is None:
        return None
    number = float(number)
    if math.isnan(number):
        return None
    return int(number) if kind == QVariant.Int else number


def result_features(features, kept, fields, columns):
    """Output features: each input feature's kept attributes plus ``columns`` (name -> (n,) array)."""
    appended = [(field.name(), field.type()) for field in list(fields)[len(kept):]]
    out = []
    for i, feature in enumerate(features):
        new = QgsFeature(fields)
        new.setGeometry(feature.geometry())
        attributes = feature.attributes()
        new.setAttributes([attributes[j] for j in kept]
                          + [_value(columns[name][i], kind) for name, kind in appended])
        out.append(new)
    return out


TABLE_FIELDS = (("metric", QVariant.String), ("rule", QVariant.String), ("estimate", QVariant.Double),
                ("std_err", QVariant.Double), ("ci_low", QVariant.Double), ("ci_high", QVariant.Double),
                ("p_value", QVariant.Double), ("ratio", QVariant.Double))


def _cell(value, kind):
    if kind == QVariant.String:
        return str(value)
    return _value(value, kind)


def write_table(algorithm, parameters, context, rows, output="OUTPUT", columns=TABLE_FIELDS):
    """Write ``rows`` to a table sink (no geometry, under its partial name: GeoCateAlgorithm.create_sink),
    then close and check it; returns its id.

    columns: (name, QVariant type) pairs; numbers that are not finite become NULL.
    """
    fields = QgsFields()
    for name, kind in columns:
        fields.append(QgsField(name, kind))
    sink, dest_id = algorithm.create_sink(parameters, output, context, fields, QgsWkbTypes.NoGeometry,
                                          QgsCoordinateReferenceSystem())
    for row in rows:
        feature = QgsFeature(fields)
        feature.setAttributes([_cell(value, kind) for value, (_, kind) in zip(row, columns)])
        if not sink.addFeature(feature, QgsFeatureSink.FastInsert):
            raise QgsProcessingException(f"Writing the table {output} failed: {sink.lastError()}. Nothing was written.")
    del sink
    algorithm.verify_written(dest_id, len(rows))
    return dest_id


def unit_columns(study, result):
    """The CATE's columns of a result layer (RESULT_FIELDS): out-of-fold cate with its interval and SE, the effect
    group or cluster (null where the unit was not used), patch_ok."""
    return {"cate": result.cate, "cate_lo": result.cate_lo, "cate_hi": result.cate_hi, "cate_se": result.cate_se,
            "group": np.where(result.group > 0, result.group, np.nan), "patch_ok": study.patch_ok.astype(int)}
