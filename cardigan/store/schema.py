"""The Milvus row: field names, the fields a read returns, the vector size and its index.

One place for what a collection holds; ``Index`` creates collections from it and every reader
(search service, reindex snapshot, verify) asks for ``OUTPUT_FIELDS``.
"""

from __future__ import annotations

from typing import Any

from pymilvus import CollectionSchema, DataType, MilvusClient

DIM = 512  # encoder.model.EMBEDDING_DIM (tests/test_encoder.py checks they agree)
PK, VECTOR = "pk", "embedding"
OUTPUT_FIELDS = ["pk", "product_id", "image_index", "image_uri", "crop", "version", "model_version", "attributes"]
# what a similarity search returns: not the crop JSON, whose duplicate-detection descriptors
# ("sig", "st", "ax": ~0.6 kB a row) no search reader uses, on every one of its k x 4 hits
SEARCH_FIELDS = [f for f in OUTPUT_FIELDS if f != "crop"]


def collection_schema() -> CollectionSchema:
    """One row per image: ``pk`` = ``<product_id>#<image_index>``, so a redelivery overwrites."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=200)
    schema.add_field("product_id", DataType.VARCHAR, max_length=200)
    schema.add_field("image_index", DataType.INT64)
    schema.add_field("image_uri", DataType.VARCHAR, max_length=1100)
    # how the image was cropped ({"bbox": [...]} or {"bbox": null}), so a reindex from the
    # index crops exactly as the event asked
    schema.add_field("crop", DataType.JSON)
    schema.add_field("version", DataType.INT64)
    schema.add_field("model_version", DataType.VARCHAR, max_length=128)
    schema.add_field("attributes", DataType.JSON)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=DIM)
    return schema


def index_params(client: MilvusClient) -> Any:
    """HNSW on cosine: the embeddings are L2-normalised."""
    idx = client.prepare_index_params()
    idx.add_index(field_name=VECTOR, index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
    return idx
