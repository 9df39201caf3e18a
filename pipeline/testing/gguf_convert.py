"""Convert a Hugging Face checkpoint directory to an f32 GGUF with llama.cpp's own converter.

Run as a script in a fresh interpreter (it puts llama.cpp's source tree first on ``sys.path``)::

    python gguf_convert.py LLAMA_CPP_SOURCE CHECKPOINT_DIR OUT.gguf

LLAMA_CPP_SOURCE is llama.cpp's source tree (``vendor/llama.cpp`` of the ``llama-cpp-python`` sdist),
which ships ``convert_hf_to_gguf.py``, its per-family model classes (``conversion/``) and ``gguf-py``.
This drives those classes as ``convert_hf_to_gguf.py`` does, with one difference: the converter names
a BPE tokenizer by hashing how it splits a fixed text and refuses one it does not know, which the demo's
own tokenizer is; here the name is given instead ("gpt-2": byte-level BPE, no prefix space). That name
only labels how llama.cpp would tokenize text; the checks feed token ids, so it changes nothing they compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

PRE_TOKENIZER = "gpt-2"


def convert(source: Path, checkpoint: Path, out: Path) -> None:
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(checkpoint, False)
    base = get_model_class(get_model_architecture(hparams, ModelType.TEXT))

    class Named(base):  # the model class of the checkpoint's architecture, the pre-tokenizer named
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            return PRE_TOKENIZER

    with torch.inference_mode():
        Named(checkpoint, gguf.LlamaFileType.ALL_F32, out).write()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
