"""The loop's pieces without Ray: accumulation, precision, validation aggregation, epoch records."""

from __future__ import annotations

import functools
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mmray.config import ConfigError, config_from_dict, config_to_dict
from mmray.data.labels import Task
from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXELS, TEXT, label_key, mask_key
from mmray.models.encoders import CachedFeatures, feature_columns
from mmray.train import optim
from mmray.train.hooks import load_before_step
from mmray.train.loop import (
    Parts,
    TruePairs,
    build_parts,
    compute_loss,
    epoch_record,
    train_epoch,
    true_pairs,
    validation_metrics,
    with_last,
)
from mmray.train.state import Progress

CPU = torch.device("cpu")
LN2 = math.log(2.0)
CLS = Task("label", "multiclass", ("a", "b", "c"))
REG = Task("score", "regression")


class Passthrough(nn.Module):
    """A 'model' whose logits are given in the batch, so metrics can be computed by hand."""

    def forward(self, batch):
        logits = {"label": batch["cls_logits"]}
        if "reg" in batch:
            logits["score"] = batch["reg"]
        return {"logits": logits, "aux": {}, "masks": {}}


class Linear(nn.Module):
    """One linear head on a feature vector: no batch statistics, so accumulation is exact."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, batch):
        return {"logits": {"label": self.lin(batch["x"])}, "aux": {}, "masks": {}}


def cfg_with(**train):
    return config_from_dict(
        {
            "model": {"aux_loss_weight": 0.0},
            "train": {"grad_clip": None, "warmup_fraction": 0.0, "lr_scaling": "none", **train},
        }
    )


def linear_parts(cfg, model=None, total_steps=10) -> Parts:
    torch.manual_seed(0)
    model = model or Linear()
    opt = optim.build_optimizer(model, cfg.train)
    return Parts(model, opt, optim.build_scheduler(opt, total_steps, 0.0), None, "fp32", CPU)


def xy_batches(n_batches: int, rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(rows, 3, generator=g), label_key("label"): torch.randint(0, 3, (rows,), generator=g)}
        for _ in range(n_batches)
    ]


def test_with_last_flags_only_the_final_item():
    assert list(with_last([1, 2, 3])) == [(1, False), (2, False), (3, True)]
    assert list(with_last([])) == []


def test_two_accumulated_batches_equal_one_batch_of_both():
    halves = xy_batches(2, 4)
    whole = [{k: torch.cat([halves[0][k], halves[1][k]]) for k in halves[0]}]
    accumulated = linear_parts(cfg_with(grad_accum_steps=2))
    single = linear_parts(cfg_with(grad_accum_steps=1))
    totals_acc = train_epoch(accumulated, halves, cfg_with(grad_accum_steps=2), [CLS])
    totals_one = train_epoch(single, whole, cfg_with(grad_accum_steps=1), [CLS])
    assert totals_acc.steps == totals_one.steps == 1
    for a, b in zip(accumulated.model.parameters(), single.model.parameters()):
        torch.testing.assert_close(a, b)
    assert totals_acc.rows == totals_one.rows == 8
    assert totals_acc.loss_sum == pytest.approx(totals_one.loss_sum, rel=1e-6)


def test_partial_last_window_is_stepped_and_hooks_see_each_step():
    cfg = cfg_with(grad_accum_steps=2)
    parts = linear_parts(cfg)
    seen: list[int] = []
    totals = train_epoch(parts, xy_batches(5, 4), cfg, [CLS], before_step=seen.append)
    assert totals.steps == 3 and seen == [0, 1, 2]  # windows of 2, 2 and a final 1
    assert parts.scheduler.last_epoch == 3
    assert all(p.grad is None for p in parts.model.parameters())  # nothing left over for next epoch


def test_before_step_is_imported_by_name_and_called_with_rank_epoch_step(tmp_path, monkeypatch):
    (tmp_path / "mmray_recording_hook.py").write_text(
        "calls = []\n\ndef record(rank, epoch, step):\n    calls.append((rank, epoch, step))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mmray_recording_hook", raising=False)  # and gone again afterwards
    hook = load_before_step("mmray_recording_hook:record")
    cfg = cfg_with(grad_accum_steps=2)
    # As train_loop_per_worker binds it: this worker's rank and the running epoch.
    train_epoch(linear_parts(cfg), xy_batches(5, 4), cfg, [CLS], before_step=functools.partial(hook, 1, 2))
    assert sys.modules["mmray_recording_hook"].calls == [(1, 2, 0), (1, 2, 1), (1, 2, 2)]
    assert load_before_step(None) is None


def test_a_before_step_that_cannot_be_loaded_names_the_key_and_the_module():
    with pytest.raises(ConfigError, match="train.before_step: cannot import module 'no_such_mmray_module'"):
        load_before_step("no_such_mmray_module:hook")
    with pytest.raises(ConfigError, match="train.before_step: module 'tests.faults' has no function 'no_such_hook'"):
        load_before_step("tests.faults:no_such_hook")


def test_empty_shard_takes_no_step():
    cfg = cfg_with()
    parts = linear_parts(cfg)
    totals = train_epoch(parts, [], cfg, [CLS])
    assert (totals.rows, totals.steps, totals.loss_sum) == (0, 0, 0.0)


def tiny_cfg(**train):
    return config_from_dict(
        {
            "data": {"text": {"max_length": 8}, "image": {"size": 16}},
            "model": {
                "hidden_dim": 16,
                "dropout": 0.0,
                "text_encoder": {"dim": 8, "heads": 2},
                "image_encoder": {"dim": 8},
            },
            "train": {"lr": 0.01, "warmup_fraction": 0.0, "lr_scaling": "none", **train},
        }
    )


def fusion_batches(n: int = 2, rows: int = 8):
    """A learnable toy: the class is the image's mean brightness bucket, text is noise."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (rows,), generator=g)
        pixels = (y.view(-1, 1, 1, 1) * 100 + torch.randint(0, 30, (rows, 3, 16, 16), generator=g)).to(torch.uint8)
        out.append(
            {
                INPUT_IDS: torch.randint(1, 30, (rows, 8), generator=g),
                ATTENTION_MASK: torch.ones(rows, 8, dtype=torch.long),
                PIXELS: pixels,
                mask_key(TEXT): torch.ones(rows),
                mask_key(IMAGE): torch.ones(rows),
                label_key("label"): y,
            }
        )
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fusion_model_learns_in_each_precision(precision):
    cfg = tiny_cfg(precision=precision, epochs=8, batch_size=8)
    parts = build_parts(cfg, [CLS], vocab_size=30, train_rows=16, world_size=1, device=CPU)
    assert parts.precision == precision and (parts.scaler is not None) == (precision == "fp16")
    batches = fusion_batches()
    losses = [train_epoch(parts, batches, cfg, [CLS]).loss_sum / 16 for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert parts.scheduler.last_epoch == 16  # 2 steps x 8 epochs: the schedule's full length
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs wherever one is visible")
@pytest.mark.parametrize(
    "precision, dtype", [("auto", torch.bfloat16), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_fusion_model_learns_on_cuda_in_mixed_precision(precision, dtype):
    """On a GPU ``auto`` means bf16; layers really run in the reduced dtype, fp32 master weights learn,
    and fp16 scales its loss."""
    device = torch.device("cuda", 0)
    cfg = tiny_cfg(precision=precision, epochs=8, batch_size=8)
    parts = build_parts(cfg, [CLS], vocab_size=30, train_rows=16, world_size=1, device=device)
    assert parts.precision == ("bf16" if precision == "auto" else precision)
    assert (parts.scaler is not None) == (dtype == torch.float16)
    seen: set[torch.dtype] = set()
    linears = [m for m in parts.model.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in linears]
    batches = [{k: v.to(device) for k, v in b.items()} for b in fusion_batches()]  # as iter_torch_batches does
    losses = [train_epoch(parts, batches, cfg, [CLS]).loss_sum / 16 for _ in range(8)]
    for h in hooks:
        h.remove()
    assert dtype in seen, seen
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in parts.model.parameters())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses


def test_build_parts_is_deterministic_under_the_seed():
    a = build_parts(tiny_cfg(seed=3), [CLS], 30, 16, 1, CPU).model.state_dict()
    b = build_parts(tiny_cfg(seed=3), [CLS], 30, 16, 1, CPU).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_cached_features_the_loop_runs_no_encoder_and_checkpoints_the_whole_model():
    """``data.cache=features``: the trained model holds no encoder (the batches carry no pixels and no
    attention mask, so none could run), and what checkpoints hold is the whole model, whose fusion and
    heads are the trained ones and whose frozen encoders do not move."""
    frozen = {"model.text_encoder.freeze": True, "model.image_encoder.freeze": True, "data.cache": "features"}
    cfg = config_from_dict(config_to_dict(tiny_cfg()), [f"{k}={str(v).lower()}" for k, v in frozen.items()])
    parts = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    assert all(isinstance(e, CachedFeatures) for e in parts.model.encoders.values())
    assert parts.saved is parts.full and parts.full.fusion is parts.model.fusion
    raw = fusion_batches()
    with torch.no_grad():
        columns = [feature_columns(parts.full.eval().encode(b), tokens=False) for b in raw]
    batches = [{**{k: v for k, v in b.items() if k not in (PIXELS, ATTENTION_MASK)}, **c} for b, c in zip(raw, columns)]
    encoders = {k: v.clone() for k, v in parts.full.encoders.state_dict().items()}
    fusion = {k: v.clone() for k, v in parts.full.fusion.state_dict().items()}
    assert train_epoch(parts, batches, cfg, [CLS]).steps == 2
    assert all(torch.equal(v, parts.full.encoders.state_dict()[k]) for k, v in encoders.items())
    assert not all(torch.equal(v, parts.full.fusion.state_dict()[k]) for k, v in fusion.items())
    assert set(parts.saved.state_dict()) == set(build_parts(tiny_cfg(), [CLS], 30, 16, 1, CPU).model.state_dict())


# ---------------------------------------------------------------------------------------------
# Validation aggregation, by hand. softmax([ln2, 0, 0]) = [1/2, 1/4, 1/4], so each row's
# cross-entropy is ln 2 when the ln2-logit is the target and ln 4 otherwise.
#   worker 0: [ln2,0,0]->t0 (pred 0, ok, ln2)  [0,ln2,0]->t1 (pred 1, ok, ln2)  [ln2,0,0]->t2 (pred 0, ln4)
#   worker 1: [0,ln2,0]->t2 (pred 1, ln4)
# All four rows: accuracy 2/4 = 0.5 (the mean of per-worker accuracies would be (2/3 + 0)/2 = 1/3);
# loss (ln2 + ln2 + ln4 + ln4)/4 = 1.5 ln2. Confusion: class a P=1/2 R=1, b P=1/2 R=1, c P=R=0,
# so macro-F1 = (2/3 + 2/3 + 0)/3 = 4/9. Regression head: predictions 1, 2, 0 | 3 against 1.5, 2, 1 | 1
# give |errors| 0.5, 0, 1 | 2: MAE 3.5/4 = 0.875, RMSE sqrt(5.25/4); its MSE adds 5.25/4 to the loss.
# ---------------------------------------------------------------------------------------------
SHARDS = [
    {
        "cls_logits": torch.tensor([[LN2, 0, 0], [0, LN2, 0], [LN2, 0, 0]]),
        label_key("label"): torch.tensor([0, 1, 2]),
        "reg": torch.tensor([[1.0], [2.0], [0.0]]),
        label_key("score"): torch.tensor([1.5, 2.0, 1.0]),
    },
    {
        "cls_logits": torch.tensor([[0, LN2, 0]]),
        label_key("label"): torch.tensor([2]),
        "reg": torch.tensor([[3.0]]),
        label_key("score"): torch.tensor([1.0]),
    },
]


def test_validation_sums_counts_across_workers_before_dividing():
    one = [{k: v for k, v in shard.items() if k not in ("reg", label_key("score"))} for shard in SHARDS]
    other_state: list[torch.Tensor] = []
    validation_metrics(Passthrough(), [one[1]], [CLS], {}, reduce=lambda s: other_state.append(s) or s)
    # What all_reduce does for worker 0: its own sums plus worker 1's.
    m = validation_metrics(Passthrough(), [one[0]], [CLS], {}, reduce=lambda s: s + other_state[0])
    assert m["rows"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(1.5 * LN2)
    assert m["macro_f1"] == pytest.approx(4 / 9)
    alone = validation_metrics(Passthrough(), [one[0]], [CLS], {}, reduce=lambda s: s)
    assert alone["accuracy"] == pytest.approx(2 / 3) and alone["rows"] == 3  # worker 0 on its own


def test_validation_reports_each_task_by_name():
    other_state: list[torch.Tensor] = []
    validation_metrics(Passthrough(), [SHARDS[1]], [CLS, REG], {}, reduce=lambda s: other_state.append(s) or s)
    m = validation_metrics(Passthrough(), [SHARDS[0]], [CLS, REG], {}, reduce=lambda s: s + other_state[0])
    assert m["label/accuracy"] == pytest.approx(0.5) and m["label/macro_f1"] == pytest.approx(4 / 9)
    assert m["score/mae"] == pytest.approx(0.875) and m["score/rmse"] == pytest.approx(math.sqrt(5.25 / 4))
    assert m["loss"] == pytest.approx(1.5 * LN2 + 5.25 / 4)
    assert "accuracy" not in m  # unprefixed names only for a single task


def test_aux_head_loss_counts_only_rows_that_have_the_modality():
    # Fused head right on both rows (ln2 each, x weight 2); the text head is right on row 0 (ln2) and
    # wrong on row 1 (ln4), but row 1 has no text, so only row 0 counts: 2ln2 + 0.5 * 2ln2 = 3 ln2.
    out = {
        "logits": {"label": torch.tensor([[LN2, 0, 0], [LN2, 0, 0]])},
        "aux": {TEXT: {"label": torch.tensor([[LN2, 0, 0], [0, LN2, 0]])}},
        "masks": {TEXT: torch.tensor([1.0, 0.0])},
    }
    batch = {label_key("label"): torch.tensor([0, 0])}
    loss, rows = compute_loss(out, batch, [CLS], {"label": 2.0}, aux_weight=0.5)
    assert loss.item() == pytest.approx(3 * LN2)
    torch.testing.assert_close(rows, torch.tensor([2 * LN2, 2 * LN2]))
    out["masks"][TEXT] = torch.zeros(2)  # no row has text: the aux head adds nothing (no 0/0)
    assert compute_loss(out, batch, [CLS], {"label": 2.0}, aux_weight=0.5)[0].item() == pytest.approx(2 * LN2)


MATCH = Task("match", "binary", ("no", "yes"))
TAGS = Task("tags", "multilabel", ("red", "round"))


def test_true_pairs_resolve_against_the_label_maps():
    assert true_pairs("all", [MATCH]) == TruePairs()
    assert true_pairs("match = yes", [MATCH]) == TruePairs("match", 1, "binary")
    assert true_pairs("tags=round", [MATCH, TAGS]) == TruePairs("tags", 1, "multilabel")
    with pytest.raises(ValueError, match=r"model\.align\.pairs: no task 'label' \(tasks: \['match'\]\)"):
        true_pairs("label=yes", [MATCH])
    with pytest.raises(ValueError, match=r"model\.align\.pairs: 'maybe' is not a label of 'match'"):
        true_pairs("match=maybe", [MATCH])


def test_true_pairs_keep_rows_with_both_modalities_and_the_label():
    masks = {TEXT: torch.tensor([1.0, 1.0, 0.0, 1.0]), IMAGE: torch.tensor([1.0, 1.0, 1.0, 0.0])}
    batch = {label_key("match"): torch.tensor([1.0, 0.0, 1.0, 1.0]), label_key("tags"): torch.eye(2)[[1, 1, 1, 0]]}
    assert TruePairs().rows(batch, masks).tolist() == [True, True, False, False]
    assert TruePairs("match", 1, "binary").rows(batch, masks).tolist() == [True, False, False, False]
    assert TruePairs("match", 0, "binary").rows(batch, masks).tolist() == [False, True, False, False]
    assert TruePairs("tags", 1, "multilabel").rows(batch, masks).tolist() == [True, True, False, False]


def test_alignment_loss_is_added_over_the_true_pairs_only(seed):
    from mmray.models.align import info_nce

    aligned = {m: torch.nn.functional.normalize(torch.randn(4, 3), dim=-1) for m in (IMAGE, TEXT)}
    scale = torch.tensor(10.0)
    out = {
        "logits": {"match": torch.zeros(4)},
        "aux": {},
        "masks": {TEXT: torch.ones(4), IMAGE: torch.ones(4)},
        "aligned": aligned,
        "aligned_scale": scale,
    }
    batch = {label_key("match"): torch.tensor([1.0, 0.0, 1.0, 1.0])}
    base, rows = compute_loss(out, batch, [MATCH], {}, aux_weight=0.0)
    assert base.item() == pytest.approx(LN2)  # zero logits on a binary head
    pairs = TruePairs("match", 1, "binary")
    loss, same_rows = compute_loss(out, batch, [MATCH], {}, 0.0, align_weight=0.5, pairs=pairs)
    keep = torch.tensor([0, 2, 3])  # row 1 is a "no": its caption does not describe its image
    expected = base + 0.5 * info_nce(aligned[IMAGE][keep], aligned[TEXT][keep], scale)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(same_rows, rows)  # metrics see only the task loss
    assert compute_loss(out, batch, [MATCH], {}, 0.0, align_weight=0.0, pairs=pairs)[0].item() == base.item()


def test_pairs_of_one_caption_are_positives_of_each_other_not_negatives(seed):
    from mmray.models.align import info_nce, same_rows

    ids = torch.tensor([[5, 7, 0], [5, 7, 0], [6, 0, 0], [5, 7, 1]])  # rows 0 and 1: one caption
    positives = same_rows(ids)
    assert positives.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    aligned = {m: torch.nn.functional.normalize(torch.randn(4, 3), dim=-1) for m in (IMAGE, TEXT)}
    out = {
        "logits": {"match": torch.zeros(4)},
        "aux": {},
        "masks": {TEXT: torch.ones(4), IMAGE: torch.ones(4)},
        "aligned": aligned,
        "aligned_scale": torch.tensor(10.0),
    }
    batch = {label_key("match"): torch.ones(4), INPUT_IDS: ids}
    loss, _ = compute_loss(out, batch, [MATCH], {}, 0.0, align_weight=1.0, pairs=TruePairs("match", 1, "binary"))
    # By hand: image 0's targets are captions 0 and 1 by half each (and caption 0's images 0 and 1).
    logits = 10.0 * aligned[IMAGE] @ aligned[TEXT].T
    soft = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    by_hand = -((soft * logits.log_softmax(1)).sum(1).mean() + (soft * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(loss - LN2, by_hand)
    one_each = info_nce(aligned[IMAGE], aligned[TEXT], torch.tensor(10.0), torch.eye(4) > 0)
    torch.testing.assert_close(one_each, info_nce(aligned[IMAGE], aligned[TEXT], torch.tensor(10.0)))


def test_matching_loss_is_the_weighted_binary_cross_entropy_of_its_pairs_and_negatives():
    out = {
        "logits": {"match": torch.zeros(3)},
        "aux": {},
        "masks": {TEXT: torch.ones(3), IMAGE: torch.ones(3)},
        "match": (torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])),
    }
    batch = {label_key("match"): torch.ones(3)}
    base, _ = compute_loss(out, batch, [MATCH], {}, 0.0)
    loss, _ = compute_loss(out, batch, [MATCH], {}, 0.0, match_weight=0.5)
    sigmoid = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5])).tolist()
    by_hand = -(math.log(sigmoid[0]) + math.log(1 - sigmoid[1]) + math.log(1 - sigmoid[2])) / 3
    assert (loss - base).item() == pytest.approx(0.5 * by_hand, rel=1e-5)
    empty = {**out, "match": (torch.zeros(0, requires_grad=True), torch.zeros(0))}
    assert compute_loss(empty, batch, [MATCH], {}, 0.0, match_weight=0.5)[0].item() == base.item()


def test_without_tasks_the_loss_is_the_alignment_alone_and_validation_reports_it(seed):
    """mmray pretrain: no task heads; the training loss is the alignment's, and validation reports the
    in-batch alignment loss per pair (what its checkpoint metric, val_align_loss, reads)."""
    from mmray.models.align import info_nce

    aligned = {m: torch.nn.functional.normalize(torch.randn(4, 3), dim=-1) for m in (IMAGE, TEXT)}
    out = {
        "logits": {},
        "aux": {},
        "masks": {TEXT: torch.ones(4), IMAGE: torch.ones(4)},
        "aligned": aligned,
        "aligned_scale": torch.tensor(10.0),
    }
    batch = {INPUT_IDS: torch.arange(8).view(4, 2)}
    loss, rows = compute_loss(out, batch, [], {}, 0.0, align_weight=1.0)
    torch.testing.assert_close(loss, info_nce(aligned[IMAGE], aligned[TEXT], torch.tensor(10.0)))
    assert rows.tolist() == [0.0] * 4

    class Aligned(torch.nn.Module):
        def forward(self, batch):
            return out

    metrics = validation_metrics(Aligned(), [batch, batch], [], {}, reduce=lambda t: t, pairs=TruePairs())
    assert metrics["align_loss"] == pytest.approx(loss.item()) and metrics["rows"] == 8


def _eval_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    # A file rendezvous: no port chosen in advance that another process could take first.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metrics = validation_metrics(Passthrough(), [SHARDS[rank]], [CLS, REG], {})  # the real all_reduce
        torch.save(metrics, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # spawns two processes that import torch and Ray (~15 s here)
def test_two_processes_all_reduce_to_the_hand_computed_metrics(tmp_path):
    mp.start_processes(_eval_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):  # every rank ends with the same, global numbers
        m = torch.load(tmp_path / f"rank{rank}.pt")
        assert m["rows"] == 4
        assert m["label/accuracy"] == pytest.approx(0.5)
        assert m["score/mae"] == pytest.approx(0.875)
        assert m["loss"] == pytest.approx(1.5 * LN2 + 5.25 / 4)


def _align_shard(rank: int) -> dict[str, torch.Tensor]:
    """32 rows of pooled vectors; rank 0 holds 9 true pairs ("yes"), rank 1 holds 20, one without text."""
    g = torch.Generator().manual_seed(10 + rank)
    yes = torch.zeros(32)
    yes[torch.randperm(32, generator=g)[: (9, 21)[rank]]] = 1.0
    text_mask = torch.ones(32)
    if rank == 1:
        text_mask[yes.nonzero()[0]] = 0.0  # a "yes" row without text is no pair
    return {
        TEXT: torch.randn(32, 6, generator=g),
        IMAGE: torch.randn(32, 5, generator=g),
        INPUT_IDS: torch.randint(0, 3, (32, 2), generator=g),  # 9 captions: ranks share some
        mask_key(TEXT): text_mask,
        label_key("match"): yes,
    }


def _align_loss_and_grads(ranks: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The alignment loss over the rows of ``ranks`` (concatenated) and its gradient in a shared projection."""
    from mmray.models.align import AlignProjection

    torch.manual_seed(0)  # the same projection in every process, as DDP's initial broadcast makes it
    proj = AlignProjection({TEXT: 6, IMAGE: 5}, dim=4, temperature=0.1)
    batch = {k: torch.cat([_align_shard(r)[k] for r in ranks]) for k in _align_shard(0)}
    n = batch[TEXT].shape[0]
    out = {
        "logits": {"match": torch.zeros(n)},
        "aux": {},
        "masks": {TEXT: batch[mask_key(TEXT)], IMAGE: torch.ones(n)},
        "aligned": proj({m: batch[m] for m in (TEXT, IMAGE)}),
        "aligned_scale": proj.scale(),
    }
    loss, _ = compute_loss(out, batch, [MATCH], {}, 0.0, align_weight=1.0, pairs=TruePairs("match", 1, "binary"))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in proj.named_parameters()}


def _align_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(_align_loss_and_grads([rank]), os.path.join(out_dir, f"align{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # spawns two processes that import torch and Ray (~15 s here)
def test_two_workers_align_over_every_workers_pairs_as_one_process_over_both_batches(tmp_path):
    """Issue 31: negatives come from every worker. Two ranks of 32 rows (9 and 20 true pairs) compute the
    loss of one process on all 64 rows, and the rank-averaged gradient (DDP's) is that process's."""
    mp.start_processes(
        _align_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    loss, grads = _align_loss_and_grads([0, 1])
    local_only, _ = _align_loss_and_grads([0])
    assert loss.item() > LN2 + 0.1 and local_only.item() != pytest.approx(loss.item())
    per_rank = [torch.load(tmp_path / f"align{rank}.pt") for rank in (0, 1)]
    for rank_loss, _ in per_rank:
        torch.testing.assert_close(rank_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close((per_rank[0][1][name] + per_rank[1][1][name]) / 2, grad)


def test_epoch_record_has_the_history_fields():
    parts = build_parts(tiny_cfg(lr=0.01, encoder_lr=0.001), [CLS], 30, 16, 1, CPU)
    record = epoch_record(
        2,
        torch.tensor([30.0, 20.0, 6.0, 4.0], dtype=torch.float64),
        {"loss": 1.2, "accuracy": 0.5},
        train_s=4.0,
        val_s=1.0,
        parts=parts,
        progress=Progress(epoch=2, resumed_from_epoch=0),
    )
    assert record["epoch"] == 2 and record["train_loss"] == pytest.approx(1.5)
    assert record["val_loss"] == 1.2 and record["val_accuracy"] == 0.5
    assert record["rows_per_s"] == pytest.approx(5.0) and record["epoch_s"] == 4.0 and record["eval_s"] == 1.0
    assert record["lr"] == pytest.approx(0.01) and record["encoder_lr"] == pytest.approx(0.001)
    assert record["resumed_from_epoch"] == 0 and record["step"] == 0
    assert record["grad_norm"] == pytest.approx(1.5)  # 6.0 summed over 4 optimizer steps


def test_resume_from_a_given_checkpoint_unless_ray_train_has_one(tmp_path, monkeypatch):
    from mmray.checkpoint import CheckpointInfo, save_checkpoint
    from mmray.train import loop
    from mmray.train.state import get_rng_state, train_state

    cfg = tiny_cfg(batch_size=8)
    trained = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    train_epoch(trained, fusion_batches(), cfg, [CLS])
    history = [{"epoch": 0}, {"epoch": 1}]
    info = CheckpointInfo(cfg.model, {"text": {}, "image": {}}, (CLS,), 30, 1, {})
    saved = Progress(epoch=1, history=history)
    state = train_state(trained.optimizer, trained.scheduler, None, saved, [get_rng_state()])
    save_checkpoint(tmp_path / "given", trained.model, info, {}, state)
    monkeypatch.setattr(loop, "print0", lambda *a: None)
    monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: None)
    resumed_cfg = config_from_dict(
        {**config_to_dict(cfg), "train": {**config_to_dict(cfg)["train"], "resume_from": str(tmp_path / "given")}}
    )
    fresh = build_parts(resumed_cfg, [CLS], 30, 16, 1, CPU)
    progress = loop._resume(fresh, resumed_cfg, 0, 1)
    assert progress.next_epoch == 2 and progress.history == history and progress.resumed_from_epoch == 1
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())

    # After a restart Ray Train's latest checkpoint wins: it is newer than where the run started from.
    state = train_state(trained.optimizer, trained.scheduler, None, Progress(epoch=4), [get_rng_state()])
    latest = CheckpointInfo(cfg.model, {"text": {}, "image": {}}, (CLS,), 30, 4, {})
    save_checkpoint(tmp_path / "latest", trained.model, latest, {}, state)
    monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: loop.ray.train.Checkpoint(str(tmp_path / "latest")))
    assert loop._resume(build_parts(resumed_cfg, [CLS], 30, 16, 1, CPU), resumed_cfg, 0, 1).next_epoch == 5

    monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: None)
    assert loop._resume(build_parts(cfg, [CLS], 30, 16, 1, CPU), cfg, 0, 1) == Progress()  # fresh run
