"""Hugging Face interop: translation tables and converters, outside the model code.

`import_hf` turns a local Hugging Face directory into a layerjax run directory; `export_hf` turns a
run directory back into a directory `transformers` loads. See README "Hugging Face models".
"""

from layerjax.interop.families import FAMILIES, UnsupportedModelError
from layerjax.interop.hf_export import export_hf
from layerjax.interop.hf_import import import_hf
from layerjax.interop.safetensors_io import CheckpointFormatError

__all__ = ["FAMILIES", "CheckpointFormatError", "UnsupportedModelError", "export_hf", "import_hf"]
