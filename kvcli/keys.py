"""Every key kvcli writes, in one place: GGUF metadata namespaced under ``kvcli.`` (predictor
files, cut auxiliaries, converted models) and the entries of a bundle's manifest.

Standard GGUF keys come from ``gguf.Keys``; these are kvcli's own.
"""

PREDICTOR_TYPE = "kvcli-predictor"  # general.type of a kvcli predictor file
FORMAT_VERSION = 2

PREFIX = "kvcli.predictor"
VERSION = f"{PREFIX}.version"
BASE_FINGERPRINT = f"{PREFIX}.base.fingerprint"
AUX_FINGERPRINT = f"{PREFIX}.aux.fingerprint"
BASE_N_LAYER = f"{PREFIX}.base.block_count"
AUX_N_LAYER = f"{PREFIX}.aux.block_count"
COPIED_LAYERS = f"{PREFIX}.copied_layers"  # base layer i <- aux layer i, exactly
LAYER_MAP = f"{PREFIX}.layer_map"  # per base layer: the aux layer whose K, V feed it
FEATURE_KINDS = f"{PREFIX}.feature_kinds"
KEY_SPACE = f"{PREFIX}.key_space"
ORIGIN = f"{PREFIX}.origin"  # e.g. "corenet:<checkpoint file name>"; empty for kvcli's own fit
K_WIDTHS = f"{PREFIX}.k_widths"  # per predicted layer
ALPHAS = f"{PREFIX}.ridge.alphas"  # chosen penalty per predicted layer: K then V
HELDOUT_REL_ERROR = f"{PREFIX}.ridge.heldout_rel_error"
CALIBRATION_TOKENS = f"{PREFIX}.calibration.tokens"
CALIBRATION_SOURCE = f"{PREFIX}.calibration.source"
STORAGE_TYPE = f"{PREFIX}.storage_type"  # f32, f16, q8_0 or q4_0: how the matrices are stored
FACTORED_LAYERS = f"{PREFIX}.factored_layers"  # predicted layers that read their source's basis

# an auxiliary cut from a base by kvcli records where it came from
AUX_BASE_LAYERS = "kvcli.aux.base_layers"  # per aux layer: the base layer it was cut from
AUX_BASE_FINGERPRINT = "kvcli.aux.base_fingerprint"


# tensor names, per predicted base layer: ggml shape (n_features, n_targets), i.e. numpy
# (n_targets, n_features), so that quantization blocks run along the features
def weight_name(layer: int) -> str:
    return f"kvp.blk.{layer}.weight"


def bias_name(layer: int) -> str:
    return f"kvp.blk.{layer}.bias"


def basis_name(source: int) -> str:
    """A factored predictor's shared basis of auxiliary layer ``source``'s features:
    ggml shape (n_features, rank)."""
    return f"kvp.src.{source}.basis"


# feature kinds and key spaces
FEATURE_AUX_K = "aux_k_pre_rope"
FEATURE_AUX_K_RAW = "aux_k_raw"  # out of the QKV projection: before the key norm and RoPE (corenet)
FEATURE_AUX_V = "aux_v"
FEATURE_AUX_RESIDUAL = "aux_residual_into_last_layer"  # l_out of the second-to-last layer
FEATURE_AUX_ATTN = "aux_last_layer_attention"  # kqv_out of the last layer
FEATURE_AUX_OUT = "aux_residual_out_of_last_layer"  # l_out of the last layer (needs the view)
# the same residual, each row RMS-normalised: the first predicted layer's K and V are linear in it
FEATURE_AUX_OUT_NORMED = "aux_residual_out_of_last_layer_normed"
HIDDEN_FEATURES = (FEATURE_AUX_RESIDUAL, FEATURE_AUX_ATTN)  # the default
HIDDEN_KINDS = (FEATURE_AUX_RESIDUAL, FEATURE_AUX_ATTN, FEATURE_AUX_OUT, FEATURE_AUX_OUT_NORMED)
VIEW_ONLY_KINDS = (FEATURE_AUX_OUT, FEATURE_AUX_OUT_NORMED)  # every row only in a view of the base
KEY_SPACE_PRE_ROPE = "post_norm_pre_rope"  # as llama.cpp caches them, less RoPE
KEY_SPACE_PRE_NORM = "pre_norm_pre_rope"  # the base applies its key norm, then RoPE (corenet)
KEY_SPACES = (KEY_SPACE_PRE_ROPE, KEY_SPACE_PRE_NORM)

# a bundle's manifest (manifest.json; kvcli.engine.bundle reads it, kvcli.bundles writes it)
MANIFEST_FORMAT = "format"  # always BUNDLE_FORMAT
MANIFEST_VERSION = "version"
MANIFEST_KVCLI = "kvcli"  # the kvcli version that wrote it
FILE_PATH = "path"  # per role (base, aux, predictor): where the file is, its size and sha256
FILE_SIZE = "size"
FILE_SHA256 = "sha256"
FILE_FINGERPRINT = "fingerprint"
FILE_ARCH = "arch"
FILE_STORAGE_TYPE = "type"  # the predictor's
FILE_BASE_FINGERPRINT = "base_fingerprint"  # the predictor's: the models it was fit for
FILE_AUX_FINGERPRINT = "aux_fingerprint"
PREFIX_OF_BASE = "prefix_of_base"  # aux: k for the base's own layers 0..k-1, no file
# the entries a bundle measures of itself or records (kvcli.bundles.make, .build)
MANIFEST_SPANS = "spans"  # how kvp chooses spans (kvcli.eval.span_layers)
MANIFEST_BREAK_EVEN = "break_even"  # where kvp pays (kvcli.eval.break_even)
MANIFEST_CHECK = "check"  # the self-check's figures and verdict (kvcli.eval.self_check)
MANIFEST_REFINED = "refined"  # kvcli.predict.refine's report
MANIFEST_ORIGIN = "origin"  # an imported bundle's source (kvcli.bundles.corenet_import)
SPANS_CHOOSER = "chooser"  # CHOOSER_TAIL: base layers' attention from the tail; CHOOSER_NONE
SPANS_LAYERS = "layers"
CHOOSER_TAIL = "tail"
CHOOSER_NONE = "none"
BREAK_EVEN_MIN_TOKENS = "min_tokens"  # None: kvp never paid on the lengths measured
BREAK_EVEN_TTFT_RATIO = "ttft_ratio"  # per prompt length measured: kvp's TTFT / the base's
BREAK_EVEN_PAYS_RATIO = "pays_ratio"  # the ratio under which kvp counts as paying
CHECK_WARNING = "warning"

# a model GGUF kvcli wrote from another format names its source
MODEL_ORIGIN = "kvcli.origin"
