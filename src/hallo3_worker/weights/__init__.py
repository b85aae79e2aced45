"""Finding, verifying and loading the Hallo3 weights (:mod:`.formats` <- :mod:`.locate` <- :mod:`.verify` <- :mod:`.load`).

A weights folder holds the Hugging Face repository's layout (``hallo3/``, ``cogvideox-5b-i2v-sat/vae/``,
``t5-v1_1-xxl/``, ``wav2vec/wav2vec2-base-960h/``, ``audio_separator/``, ``face_analysis/models/``), optionally with

* ``hallo3-download-manifest.json`` + ``.hallo3-download-complete``: written by the downloader (path, size and
  SHA-256 of every file, then a completion marker);
* ``converted/``: ``transformer.safetensors``, ``reference_net.safetensors`` and ``vae.safetensors`` in this
  package's parameter names, described by ``converted/hallo3-converted.json`` (configs, dtypes, sizes, SHA-256),
  written by ``builder/convert_weights.py``.

With ``converted/`` the networks load from those files, else (the cached-models case: exactly the Hugging Face
snapshot) from the SAT checkpoints, memory-mapped either way. Every problem raises :class:`WeightsError` naming the file.
"""

from hallo3_worker.weights.formats import (
    AUDIO_SEPARATOR_DIR, AUTO, AUX_REQUIRED_FILES, COMPONENT_FILES, COMPONENTS, CONVERTED_DIRNAME, CONVERTED_FORMAT,
    CONVERTED_MANIFEST, DEFAULT_HF_CACHE_DIR, DEFAULT_IMAGE_WEIGHTS_DIR, DEFAULT_VOLUME_WEIGHTS_DIR, DOWNLOAD_MANIFEST,
    DOWNLOAD_MANIFEST_FORMAT, DOWNLOAD_MARKER, FACE_ANALYSIS_DIR, FORMAT_VERSION, HALLO3_REPO_ID, IGNORED_SAT_PREFIXES,
    REFERENCE_NET, SAT_CHECKPOINT_NAME, SAT_LATEST, SAT_VAE, T5_DIR, TRANSFORMER, VAE, WAV2VEC_DIR, WAV2VEC_WEIGHT_FILES,
    InertObject, SatCheckpoint, TorchCheckpoint, WeightsError, check_file, config_from_dict, config_to_dict, read_json,
    read_sat_checkpoint, read_sat_vae_state_dict, read_torch_checkpoint, sha256_file, write_json_atomic,
)
from hallo3_worker.weights.locate import (
    WeightsLocation, hf_cache_repo_dir, locate_weights, looks_like_weights, resolve_snapshot, sat_checkpoint_relpath,
    weights_search_order,
)
from hallo3_worker.weights.verify import (
    VerificationReport, converted_component_sizes, read_converted_manifest, verify_converted, verify_download_manifest,
    verify_weights,
)
from hallo3_worker.weights.load import (
    LoadedNetworks, build_reference_net, build_transformer, build_vae_on_meta, dtype_name, load_converted_state_into,
    load_networks, load_safetensors_into, parse_dtype,
)
