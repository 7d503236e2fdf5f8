"""Column and file names of the raw-log and dataset-dir contracts, defined once (see ARCHITECTURE.md)."""

# Raw interaction log columns (after column mapping).
USER_COL = "user_id"
ITEM_COL = "item_id"
TIME_COL = "timestamp"
RATING_COL = "rating"

# Dataset-dir columns.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
NEGATIVES_COL = "negatives"  # list<int32> of item indices, fixed length per file
COUNT_COL = "count"  # popularity: interactions in train

# Dataset-dir layout.
TRAIN_DIR = "train"
VALID_FILE = "valid.parquet"
TEST_FILE = "test.parquet"
VALID_NEG_FILE = "valid_negatives.parquet"
TEST_NEG_FILE = "test_negatives.parquet"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"

# Shop logs (issue 14, area "events"): optional dataset-dir columns (contract.md sections 1-2).
EVENT_COL = "event"  # int8 index into meta["events"] (funnel order, weakest first)
CONTEXT_PREFIX = "ctx_"  # ctx_<name>: int32 global context id per interaction, 0 = unknown

SCHEMA_VERSION = 1

# Side tables (issue 14, ncf_ray/data/features.py): dataset dir and artifact `features/`.
FEATURES_DIR = "features"
FEATURES_JSON = "features.json"
FEATURE_FILES = {"items": "items.safetensors", "users": "users.safetensors"}
