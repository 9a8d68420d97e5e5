"""geocate:imageclusters - latent effect clusters learned from the imagery (Jerzak, Johansson & Daoud, CLeaR 2023)."""

import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
)
from qgis.PyQt.QtCore import QVariant

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import RESULT_FIELDS, unit_columns, write_table
from .study_parameters import (
    add_design_parameters,
    add_imagery_parameters,
    add_study_parameters,
    read_study_parameters,
)
from .styles import GROUP_STYLE

DEVICES = ["auto", "cpu", "cuda"]
#: NOISE's choices and the noise model of each (core.clusters: Gaussians in each arm's shared mixture, 0 = per cluster).
NOISE_MODELS = ["Flexible, shared by all clusters (absorbs zeros, skew, image-dependent noise)",
                "Gaussian per cluster and arm (the paper's model)"]
NOISE_COMPONENTS_OF = [3, 0]
CLUSTER_COLUMNS = (("cluster", QVariant.Int), ("effect", QVariant.Double), ("ci_low", QVariant.Double),
                   ("ci_high", QVariant.Double), ("share", QVariant.Double), ("sigma_control", QVariant.Double),
                   ("sigma_treated", QVariant.Double), ("dr_effect", QVariant.Double), ("dr_se", QVariant.Double),
                   ("n_assigned", QVariant.Int))


def log_clusters(feedback, n_features, study, result, extras):
    """The run's log: warnings, units, the held-out likelihood of each K, the tests that chose K, the noise model
    and each cluster's model and held-out effects."""
    from ..core.study import describe_dropped

    metadata = result.metadata
    for warning in metadata.get("warnings", []):
        feedback.pushWarning(warning)
    feedback.pushInfo(f"Units: {n_features}, {result.n_used} used ({describe_dropped(study.dropped)}); "
                      f"device {metadata['device']}.")
    for kk, ll, se in extras["k_table"] or []:
        feedback.pushInfo(f"K = {kk}: held-out log-likelihood per unit {ll:.4f} (SE {se:.4f})")
    test = metadata.get("effect_test")
    if test:
        feedback.pushInfo(f"Held-out test of the {test['clusters']} clusters' effects (sequential cross-fold "
                          f"AUTOC): {test['estimate']:.4f} (SE {test['std_err']:.4f}), p = {test['p_value']:.4f}.")
    feedback.pushInfo(f"{metadata['k_rule']}.")
    forest = metadata.get("forest_test")
    if forest:
        feedback.pushInfo(f"Causal forest's heterogeneity test on the same units and folds: held-out AUTOC "
                          f"{forest['estimate']:.4f} (SE {forest['std_err']:.4f}), p = {forest['p_value']:.4f}"
                          + (": it supports heterogeneity." if forest["supports_clusters"] else
                             ": it does not support the clusters (see the warning)."))
    feedback.pushInfo(f"Outcome noise: {metadata['noise']}.")
    masses = (metadata.get("estimator") or {}).get("point_masses")
    if masses:   # the hurdle part (issue 24): as the dock and the report say
        feedback.pushInfo(f"Point masses {masses}: shared by all clusters, so the model's effects and intervals are "
                          "approximate; quote each cluster's held-out effect (dr_effect).")
    if metadata.get("n_clusters", 1) > 1 and metadata.get("assignment"):
        feedback.pushInfo(f"Each unit's cluster (group) from {metadata['assignment']}.")
    for row in extras["clusters"]:
        feedback.pushInfo(f"Cluster {row[0]}: model effect {row[1]:.3f} [{row[2]:.3f}, {row[3]:.3f}], "
                          f"share {row[4]:.2f}, sigma control {row[5]:.3f}, treated {row[6]:.3f}; held-out "
                          f"effect of its {row[9]} units {row[7]:.3f} (SE {row[8]:.3f})")


class ImageClustersAlgorithm(GeoCateAlgorithm):
    result_style = GROUP_STYLE  # the cluster layer opens categorized
    CLUSTERS, MAX_CLUSTERS, EPOCHS, DEVICE = "CLUSTERS", "MAX_CLUSTERS", "EPOCHS", "DEVICE"
    NOISE, FOREST_CHECK = "NOISE", "FOREST_CHECK"
    OUTPUT, OUTPUT_CLUSTERS, OUTPUT_MODEL, OUTPUT_SALIENCE = "OUTPUT", "OUTPUT_CLUSTERS", "OUTPUT_MODEL", "OUTPUT_SALIENCE"
    OUTPUT_REPORT = "OUTPUT_REPORT"

    short_description = ("Latent clusters of units whose imagery predicts how much they gain, with each cluster's "
                         "effect, salience maps and a reusable ONNX model.")
    extra_tags = ("clusters", "ONNX", "salience")

    def name(self):
        return "imageclusters"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Find effect clusters in imagery"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Groups units by the distribution of treatment effects their images show (Jerzak, Johansson & Daoud, "
            "'Image-based Treatment Effect Heterogeneity', CLeaR 2023). A network on each unit's window gives the "
            "probabilities of K latent clusters; each cluster has its own effect (with a posterior); the outcome's "
            "noise is flexible and shared by all clusters, so that zeros or a long tail are not taken for clusters; "
            "the mixture likelihood is marginalised exactly. K is chosen ('Number of clusters' 0) by the "
            "cross-fitted held-out likelihood over 1 to 'Largest number of clusters to try', and kept above 1 only "
            "when the clusters' effects differ in units the model did not see (neighbouring clusters whose held-out "
            "effects do not differ are merged); the causal forest's heterogeneity "
            "test checks them too. K = 1 means no heterogeneity.\n\n"
            "Outputs: the units with out-of-fold cate, cate_lo, cate_hi, cate_se, group (the unit's cluster, 1 = "
            "smallest effect: with the forest's check, the most probable given both the model's probabilities and "
            "the forest's out-of-fold effect), p_1..p_K (the model's probabilities), patch_ok; a table of clusters (effect, 95 % interval, share, sigmas); the "
            "model as ONNX with its description (.onnx.json); optionally salience rasters for the units most "
            "typical of each cluster (band 1: gradient, band 2: occlusion of 3 x 3 segments), and an HTML report "
            "(the clusters with their effects and shares, the choice of K, each cluster's most typical window "
            "with its salience)."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        self.addParameter(QgsProcessingParameterNumber(
            self.CLUSTERS, "Number of clusters (0 = choose from the data)", QgsProcessingParameterNumber.Integer,
            defaultValue=0, minValue=0, maxValue=12))
        self.addParameter(QgsProcessingParameterNumber(
            self.MAX_CLUSTERS, "Largest number of clusters to try", QgsProcessingParameterNumber.Integer,
            defaultValue=4, minValue=1, maxValue=12))
        epochs = QgsProcessingParameterNumber(self.EPOCHS, "Training epochs", QgsProcessingParameterNumber.Integer,
                                              defaultValue=300, minValue=10, maxValue=100000)
        epochs.setFlags(epochs.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(epochs)
        device = QgsProcessingParameterEnum(self.DEVICE, "Device", DEVICES, defaultValue=0)
        device.setFlags(device.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(device)
        noise = QgsProcessingParameterEnum(self.NOISE, "Outcome noise", NOISE_MODELS, defaultValue=0)
        noise.setFlags(noise.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(noise)
        forest_check = QgsProcessingParameterBoolean(
            self.FOREST_CHECK, "Check the clusters against the causal forest's heterogeneity test", defaultValue=True)
        forest_check.setFlags(forest_check.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(forest_check)
        add_design_parameters(self, design=False)   # the cluster model assumes a randomized trial
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Effect clusters"))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_CLUSTERS, "Clusters", QgsProcessing.TypeVector,
                                                            optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_MODEL, "Model (ONNX)", "ONNX (*.onnx)",
                                                                optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.OUTPUT_SALIENCE, "Salience rasters (folder)", optional=True, createByDefault=False))
        add_report_parameter(self)
        for name, label in (("N_CLUSTERS", "Number of clusters used"), ("ATE", "Average treatment effect (DR)"),
                            ("ATE_SE", "Standard error of the ATE"), ("N_USED", "Units used"),
                            ("N_DROPPED", "Units dropped")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.pipeline import find_clusters

        chosen = read_study_parameters(self, parameters, context)
        salience_dir = (self.parameterAsString(parameters, self.OUTPUT_SALIENCE, context)
                        if parameters.get(self.OUTPUT_SALIENCE) else None)
        features, units = chosen.read_units(feedback)
        study, result, extras = find_clusters(
            units, **chosen.imagery_arguments(), n_clusters=self.parameterAsInt(parameters, self.CLUSTERS, context),
            max_clusters=self.parameterAsInt(parameters, self.MAX_CLUSTERS, context),
            epochs=self.parameterAsInt(parameters, self.EPOCHS, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            progress=progress_to(feedback, 5, 90), is_cancelled=feedback.isCanceled,
            noise_components=NOISE_COMPONENTS_OF[self.parameterAsEnum(parameters, self.NOISE, context)],
            forest_check=self.parameterAsBoolean(parameters, self.FOREST_CHECK, context))

        log_clusters(feedback, len(features), study, result, extras)
        # Every number is in hand: the outputs are written only now.
        dest_id = self._write_units(parameters, context, chosen.source, features, study, result)
        table_id = write_table(self, parameters, context, extras["clusters"], self.OUTPUT_CLUSTERS, CLUSTER_COLUMNS) \
            if parameters.get(self.OUTPUT_CLUSTERS) else None   # optional: qgis_process runs without it
        model_path, salience_dir = self._write_model(parameters, context, feedback, salience_dir, study, result,
                                                     extras, chosen)
        results = self.keep_result(context, dest_id, {
            self.OUTPUT: dest_id, self.OUTPUT_CLUSTERS: table_id, self.OUTPUT_MODEL: model_path or None,
            self.OUTPUT_SALIENCE: salience_dir, "N_CLUSTERS": result.metadata["n_clusters"], "ATE": result.ate,
            "ATE_SE": result.ate_se, "N_USED": result.n_used, "N_DROPPED": result.n_dropped},
            self.record(**{**result.metadata, "n_units": len(features), "n_used": result.n_used,
                           "n_dropped": result.n_dropped, "ate": result.ate, "ate_se": result.ate_se}), feedback)
        return self.write_report(parameters, context, results, feedback,
                                 lambda report: self._write_report(report, study, result, extras, chosen))

    def _write_units(self, parameters, context, source, features, study, result):
        """The units with their out-of-fold effects and cluster probabilities: the sink, checked; its id."""
        k = result.metadata["n_clusters"]
        columns = dict(unit_columns(study, result), **{f"p_{j + 1}": result.probabilities[:, j] for j in range(k)})
        return self.write_units(parameters, context, self.OUTPUT, source, features,
                                RESULT_FIELDS + tuple((f"p_{j + 1}", QVariant.Double) for j in range(k)), columns)

    def _write_model(self, parameters, context, feedback, salience_dir, study, result, extras, chosen):
        """The ONNX model (with its .onnx.json) and the salience rasters, when asked for and possible:
        (model path or None, salience folder or None)."""
        from ..core.clusters import export_onnx

        model_path = self.output_file(parameters, self.OUTPUT_MODEL, context)  # its .json travels with it
        if extras["model"] is None and (model_path or salience_dir):
            feedback.pushWarning("The cluster model file and the salience rasters cover one window at one date seen "
                                 "through random convolutions; this run used wider scales, later dates or an ONNX "
                                 "encoder, so neither is written.")
            return None, None
        if model_path:
            export_onnx(extras["model"], model_path, len(study.bands), chosen.window,
                        len(result.metadata["covariates"]),   # with STRATA, the strata's indicators too
                        {"algorithm": "geocate:imageclusters", "n_clusters": result.metadata["n_clusters"],
                         "bands_used": list(study.bands), "covariates": result.metadata["covariates"],
                         "band_scaling": result.metadata["band_scaling"], "clusters": extras["clusters"],
                         "seed": chosen.seed, "covariate_means": extras["covariate_means"],
                         "pixel_size_m": study.pixel_size_m})
            feedback.pushInfo(f"Model: {self.final_path(model_path)} (with its description, .onnx.json).")
        if salience_dir:
            written = self._write_salience(salience_dir, study, result, extras, chosen)
            feedback.pushInfo(f"{written} salience raster(s) written to {salience_dir}.")
        return model_path, salience_dir

    def _write_report(self, report, study, result, extras, chosen):
        """The cluster report, with each cluster's most typical unit and where the model looks in its window."""
        import tempfile

        from ..core.clusters import salience, typical_units
        from ..core.patches import rgb_bands
        from ..core.report import cluster_report

        typical = []
        for cluster, units in enumerate(typical_units(result.probabilities, result.group)):
            for unit in units if extras["model"] is not None else ():
                typical.append((cluster + 1, study.patches[unit],
                                salience(extras["model"], study.patches[unit], study.covariates[unit], cluster)))
        rgb = rgb_bands(chosen.raster, list(study.bands))
        order = [list(study.bands).index(b) for b in rgb] if rgb else [0]
        with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
            cluster_report(self._metadata, report, folder, typical, order)

    @staticmethod
    def _write_salience(folder, study, result, extras, chosen, per_cluster=3):
        """Salience rasters for the ``per_cluster`` units most typical of each cluster (core.clusters.typical_units:
        the units in the cluster's group with the highest probability of it)."""
        from ..core.clusters import occlusion_sensitivity, salience, typical_units, write_salience

        os.makedirs(folder, exist_ok=True)
        written = 0
        for cluster, units in enumerate(typical_units(result.probabilities, result.group, per_cluster)):
            for unit in units:
                gradient = salience(extras["model"], study.patches[unit], study.covariates[unit], cluster)
                occlusion = occlusion_sensitivity(extras["model"], study.patches[unit], study.covariates[unit],
                                                  cluster)
                write_salience(os.path.join(folder, f"cluster{cluster + 1}_unit{unit + 1}.tif"),
                               chosen.raster, study.coords[unit], chosen.window, gradient,
                               occlusion)
                written += 1
        return written
