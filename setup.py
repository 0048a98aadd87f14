"""roberta_zh: Chinese RoBERTa/BERT whole-word-mask pretraining and fine-tuning on TensorFlow 2."""

import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).parent
# The toolkit is a handful of top-level scripts, as in google-research/bert.
MODULES = sorted(p.stem for p in HERE.glob("*.py") if p.stem != "setup")

setup(
    name="roberta_zh",
    version="0.1.0",
    description="Chinese RoBERTa/BERT with whole-word masking: pretraining data, TF2 training, "
                "fine-tuning, and export to HuggingFace PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=MODULES,
    install_requires=[
        "tensorflow>=2.16",
        "jieba>=0.42",
        "numpy",
        "google-crc32c>=1.5",  # TFRecord checksums in generator workers, which never import TensorFlow
        "charset-normalizer>=3",  # names the likely encoding of a corpus that is not UTF-8
        "absl-py",
        "tensorboard",  # tf.summary.scalar needs it since TF 2.20
    ],
    extras_require={
        # torch is pinned by .ci/run / Makefile to the CPU build before this is resolved.
        "export": ["torch>=2.1", "transformers>=4.40", "safetensors"],
        "fast": ["rjieba"],
        "demo": ["matplotlib", "snownlp"],
        "tfds": ["tensorflow-datasets"],  # run_classifier.py --tfds_name
        # create_pretraining_data.py --runner=...: Beam pins protobuf<7 (TF 2.21 accepts >=6.31.1,<8).
        "beam": ["apache-beam>=2.77"],
        "dataflow": ["apache-beam[gcp]>=2.77"],  # DataflowRunner and gs:// paths
        # KERAS_BACKEND=jax (the CPU wheel; GPU/TPU machines install jax[cuda12] / jax[tpu] instead).
        "jax": ["jax>=0.4.30", "safetensors"],
        "test": ["pytest", "ruff", "torch>=2.1", "transformers>=4.40", "safetensors", "rjieba",
                 "matplotlib", "snownlp", "tensorflow-datasets"],
    },
)
