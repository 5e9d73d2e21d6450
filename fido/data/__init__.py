"""fido.data: tokenizer, FiD-format reader, features, span corruption, grain pipelines, TFDS
builders, synthetic retrieval QA. Import the submodules directly (`from fido.data import pipeline`).
"""

from fido.data.errors import DataError

__all__ = ["DataError"]
