"""twophase.bench.model_bytes: which values a decode step reads by row, not whole."""

from twophase.bench.model_bytes import row_read_names


def test_row_read_names():
    """Gather-like tables (input 0), GroupQueryAttention's cos / sin (inputs 7, 8) and every QGather input but the ids
    are read by row; a value that any other reader takes whole counts as streamed."""
    gqa = ["qkv", "", "", "past_k", "past_v", "seqlens", "total", "cos", "sin"]
    nodes = [
        ("Gather", ["embed", "ids"]),
        ("GroupQueryAttention", gqa),
        ("QGather", ["table", "ids", "table_scale", "table_offset"]),
        ("Gather", ["tied", "ids"]),
        ("MatMul", ["x", "tied"]),  # a tied lm_head reads the whole table
        ("GatherBlockQuantized", ["qtable", "ids", "qscale"]),
    ]
    assert row_read_names(nodes) == {"embed", "cos", "sin", "table", "table_scale", "table_offset", "qtable"}
    assert row_read_names([]) == set()
