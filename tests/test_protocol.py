"""Every operation of mentor.protocol.Batch, including its errors."""

import pickle

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mentor.protocol import Batch


def make_batch(b: int = 4) -> Batch:
    """Row i holds input_ids [10i, 10i+1, 10i+2], response_mask ones, uid 'u{i//2}', one list object."""
    return Batch(
        tensors={
            "input_ids": torch.arange(3 * b).view(b, 3) + 7 * torch.arange(b)[:, None],
            "response_mask": torch.ones(b, 2),
        },
        non_tensors={"uid": [f"u{i // 2}" for i in range(b)], "steps": [[i, i] for i in range(b)]},
        meta={"temperature": 1.0},
    )


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.tensor_keys == b.tensor_keys and a.non_tensor_keys == b.non_tensor_keys
    for k in a.tensor_keys:
        assert_close(a[k], b[k])
    for k in a.non_tensor_keys:
        assert a[k].shape == b[k].shape and list(a[k]) == list(b[k])
    assert a.meta == b.meta


# ---- construction -------------------------------------------------------------------------


def test_construction_exposes_len_keys_and_values():
    batch = make_batch()
    assert len(batch) == 4
    assert batch.keys() == ["input_ids", "response_mask", "uid", "steps"]
    assert "uid" in batch and "input_ids" in batch and "nope" not in batch
    assert batch["input_ids"].shape == (4, 3)
    assert list(batch["uid"]) == ["u0", "u0", "u1", "u1"]
    # a list of equal-length lists stays a 1-D object array with one entry per sample
    assert batch["steps"].shape == (4,) and batch["steps"][2] == [2, 2]
    assert "B=4" in repr(batch)


def test_construction_errors_name_key_and_shapes():
    msg = r"'b' has shape \(3, 2\) but the batch size is 4 \(from 'a' with shape \(4,\)\)"
    with pytest.raises(ValueError, match=msg):
        Batch({"a": torch.zeros(4), "b": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"'uid' has shape \(3,\) but the batch size is 4"):
        Batch({"a": torch.zeros(4)}, {"uid": ["x"] * 3})
    with pytest.raises(ValueError, match="'a' is 0-dim"):
        Batch({"a": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="tensor 'a' must be a torch.Tensor"):
        Batch({"a": [1, 2]})
    with pytest.raises(TypeError, match="non-tensor 'uid' must be a list"):
        Batch(non_tensors={"uid": "abc"})
    with pytest.raises(ValueError, match=r"\['a'\] given both as tensor and non-tensor"):
        Batch({"a": torch.zeros(2)}, {"a": [1, 2]})


def test_batch_without_tensors_and_explicit_batch_size():
    assert len(Batch(non_tensors={"uid": np.array(["a", "b", "c"])})) == 3
    assert len(Batch(batch_size=5)) == 5
    assert len(Batch()) == 0


def test_getitem_and_setitem():
    batch = make_batch()
    with pytest.raises(KeyError, match="no key 'advantages'; available"):
        batch["advantages"]
    with pytest.raises(TypeError, match=r"use \.index\(\) for rows"):
        batch[0]
    batch["advantages"] = torch.zeros(4, 2)
    batch["ground_truth"] = ["1", "2", "3", "4"]
    assert batch.tensor_keys[-1] == "advantages" and batch["ground_truth"][3] == "4"
    batch["uid"] = torch.arange(4)  # a key may change kind
    assert "uid" in batch.tensor_keys and "uid" not in batch.non_tensor_keys
    with pytest.raises(ValueError, match="'x' has leading dim 3 but the batch size is 4"):
        batch["x"] = torch.zeros(3)


# ---- key-wise -----------------------------------------------------------------------------


def test_select_keeps_only_requested_keys_and_meta():
    sel = make_batch().select(["input_ids", "uid"])
    assert sel.keys() == ["input_ids", "uid"] and sel.meta == {"temperature": 1.0}
    with pytest.raises(KeyError, match=r"no key\(s\) \['nope'\]"):
        make_batch().select(["input_ids", "nope"])


def test_union_merges_keys_and_accepts_equal_overlap():
    batch = make_batch()
    extra = Batch({"input_ids": batch["input_ids"].clone(), "old_log_probs": torch.zeros(4, 2)},
                  {"uid": list(batch["uid"])}, meta={"step": 3})
    out = batch.union(extra)
    assert out.keys() == ["input_ids", "response_mask", "old_log_probs", "uid", "steps"]
    assert out.meta == {"temperature": 1.0, "step": 3}
    assert "old_log_probs" not in batch  # the inputs are not modified


def test_union_errors_name_the_key():
    batch = make_batch()
    msg = r"tensor 'response_mask' differs \(\(4, 2\) torch.float32 vs \(4, 2\) torch.float32\)"
    with pytest.raises(ValueError, match=msg):
        batch.union(Batch({"response_mask": torch.zeros(4, 2)}))
    with pytest.raises(ValueError, match="non-tensor 'uid' differs"):
        batch.union(Batch(non_tensors={"uid": ["z"] * 4}))
    with pytest.raises(ValueError, match=r"batch sizes differ \(4 vs 2\)"):
        batch.union(make_batch(2))
    with pytest.raises(ValueError, match="meta key 'temperature' differs"):
        batch.union(Batch(batch_size=4, meta={"temperature": 0.6}))
    with pytest.raises(ValueError, match="key 'uid' is a non-tensor here but a tensor"):
        batch.union(Batch({"uid": torch.zeros(4)}))
    with pytest.raises(ValueError, match="key 'input_ids' is a tensor here but a non-tensor"):
        batch.union(Batch(non_tensors={"input_ids": [0] * 4}))


# ---- row-wise -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "idx",
    [[2, 0], np.array([2, 0]), torch.tensor([2, 0]), torch.tensor([False, False, True, False])],
)
def test_index_by_list_array_tensor_and_mask(idx):
    batch = make_batch()
    out = batch.index(idx)
    rows = [2, 0] if len(idx) == 2 else [2]
    assert_close(out["input_ids"], batch["input_ids"][rows])
    assert list(out["uid"]) == [batch["uid"][r] for r in rows]
    assert out.meta == batch.meta


def test_index_by_slice_and_errors():
    batch = make_batch()
    assert_close(batch.index(slice(1, 3))["input_ids"], batch["input_ids"][1:3])
    with pytest.raises(TypeError, match=r"pass \[1\] to keep the batch dim"):
        batch.index(1)
    with pytest.raises(ValueError, match=r"bool mask has shape \(2,\), batch size is 4"):
        batch.index(torch.tensor([True, False]))


def test_repeat_interleave_order_and_tiled_order():
    batch = make_batch(2)  # uids u0, u0; use input_ids rows to tell rows apart
    first = batch["input_ids"][:, 0].tolist()  # [0, 10]
    inter = batch.repeat(3, interleave=True)
    assert inter["input_ids"][:, 0].tolist() == [first[0]] * 3 + [first[1]] * 3
    assert [s[0] for s in inter["steps"]] == [0, 0, 0, 1, 1, 1]
    tiled = batch.repeat(3, interleave=False)
    assert tiled["input_ids"][:, 0].tolist() == first * 3
    assert [s[0] for s in tiled["steps"]] == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="n must be >= 1"):
        batch.repeat(0)


def test_chunk_then_concat_round_trips():
    batch = make_batch(6)
    parts = batch.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert_close(parts[1]["input_ids"], batch["input_ids"][2:4])
    assert_batches_equal(Batch.concat(parts), batch)
    with pytest.raises(ValueError, match="B=6 is not divisible by n=4"):
        batch.chunk(4)


def test_concat_merges_meta_and_rejects_mismatches():
    a, b = make_batch(2), make_batch(2)
    b.meta["step"] = 3
    assert Batch.concat([a, b]).meta == {"temperature": 1.0, "step": 3}
    a.meta["metrics"], b.meta["metrics"] = {"gen_s": 1.0}, {"gen_s": 2.0}  # no special key: differing values raise
    with pytest.raises(ValueError, match="meta key 'metrics' differs"):
        Batch.concat([a, b])
    del a.meta["metrics"], b.meta["metrics"]
    with pytest.raises(ValueError, match="empty list"):
        Batch.concat([])
    with pytest.raises(ValueError, match="batch 1 has keys"):
        Batch.concat([a, a.select(["input_ids"])])
    longer = make_batch(2)
    longer["response_mask"] = torch.ones(2, 5)
    msg = r"tensor 'response_mask' is \(2, 5\) torch.float32 in batch 1 but \(2, 2\)"
    with pytest.raises(ValueError, match=msg):
        Batch.concat([a, longer])
    hot = make_batch(2)
    hot.meta["temperature"] = 0.7
    with pytest.raises(ValueError, match="meta key 'temperature' differs"):
        Batch.concat([a, hot])


@pytest.mark.parametrize("b, divisor, pad", [(4, 3, 2), (2, 7, 5), (6, 3, 0), (5, 1, 0)])
def test_pad_to_divisor_repeats_leading_rows_and_unpad_round_trips(b, divisor, pad):
    batch = make_batch(b)
    padded, pad_size = batch.pad_to_divisor(divisor)
    assert pad_size == pad and len(padded) % divisor == 0
    # padding rows are rows 0, 1, ..., cycling (verl)
    assert_close(padded["input_ids"][b:], batch["input_ids"][torch.arange(pad) % b])
    assert list(padded["uid"][b:]) == [batch["uid"][i % b] for i in range(pad)]
    restored = padded.unpad(pad_size)
    assert_batches_equal(restored, batch)
    assert len(padded.chunk(divisor)) == divisor


def test_pad_and_unpad_errors():
    assert Batch(batch_size=0).pad_to_divisor(2)[1] == 0  # 0 rows are divisible by anything
    with pytest.raises(ValueError, match="divisor must be >= 1"):
        make_batch().pad_to_divisor(0)
    with pytest.raises(ValueError, match=r"pad_size=5 outside \[0, B=4\]"):
        make_batch().unpad(5)


# ---- transport ----------------------------------------------------------------------------


def test_to_device_keeps_values():
    batch = make_batch()
    moved = batch.to("cpu")
    assert moved["input_ids"].device.type == "cpu"
    assert_batches_equal(moved, batch)


def test_pickle_round_trip():
    batch = make_batch()
    batch.meta["step"] = 7
    batch["gt"] = np.array([{"answer": i} for i in range(4)], dtype=object)
    restored = pickle.loads(pickle.dumps(batch))
    assert isinstance(restored, Batch) and len(restored) == 4
    assert_batches_equal(restored, batch)
    assert restored["gt"][3] == {"answer": 3}
