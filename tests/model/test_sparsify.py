"""Dynamic-LLaVA sparsification in training: schedule, masks, masked attention, keep-rate loss, spans, and the
original checkpoints' predictor names."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from omnibal_pl.batch import PackedBatch
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch, varlen_attention
from omnibal_pl.model.sparsify import (
    DROP, KEEP, Sparsifier, SparsifyConfig, TextPredictor, VisionPredictor, boundary_width, find_spans, gumbel_keep,
    gumbel_tau, keep_rate_loss, load_original_predictors, masked_varlen_attention, original_predictor_state_dict,
    predictor_flops, set_temperature, split_output, topk_keep,
)
from omnibal_pl.train.callbacks import GumbelTemperature
from omnibal_pl.train.optim import OptimConfig, param_groups

from tests.helpers import SMALL_PREDICTOR, bias_predictors, model_config, tiny_cfg

def test_temperature_schedule_values():
    assert gumbel_tau(0, 100) == pytest.approx(1.0)
    assert gumbel_tau(50, 100) == pytest.approx(0.1 ** 0.5)
    assert gumbel_tau(100, 100) == pytest.approx(0.1)
    assert gumbel_tau(250, 100) == pytest.approx(0.1)  # clamped after the run
    assert gumbel_tau(25, 100, start=2.0, end=0.5) == pytest.approx(2.0 * 0.25 ** 0.25)
    with pytest.raises(ConfigError):
        gumbel_tau(0, 0)


def test_temperature_callback_sets_every_sparsifier():
    model = VLM(tiny_cfg(sparsify=False))
    model.enable_sparsify(SparsifyConfig(enabled=True, **SMALL_PREDICTOR, tau_start=1.0, tau_end=0.01))
    trainer = SimpleNamespace(global_step=5, estimated_stepping_batches=10)
    GumbelTemperature().on_train_batch_start(trainer, model, None, 0)
    assert model.llm.layers["1"].sparsifier.tau == pytest.approx(0.1)


def test_gumbel_keep_is_hard_with_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.randn(200, 2, requires_grad=True)
    keep = gumbel_keep(logits, tau=0.5)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0 < keep.detach().sum() < 200
    keep.sum().backward()
    assert (logits.grad[:, KEEP] > 0).all() and (logits.grad[:, 1 - KEEP] < 0).all()


def test_masked_attention_with_all_keep_equals_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(23, 4, 8), torch.randn(23, 2, 8), torch.randn(23, 2, 8)
    cu = torch.tensor([0, 9, 20, 23], dtype=torch.int32)
    ref = varlen_attention(q, k, v, cu, 11, causal=True, backend="sdpa")
    torch.testing.assert_close(masked_varlen_attention(q, k, v, torch.ones(23), cu), ref, rtol=1e-5, atol=1e-5)


def test_masked_attention_hides_dropped_keys_but_not_from_themselves():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    out = masked_varlen_attention(q, k, v, keep, cu)
    kept = [0, 2, 3, 5]
    sub = varlen_attention(q[kept], k[kept], v[kept], torch.tensor([0, 4], dtype=torch.int32), 4, causal=True, backend="sdpa")
    torch.testing.assert_close(out[kept], sub, rtol=1e-5, atol=1e-5)  # kept tokens never see dropped keys
    # a dropped token sees the kept keys before it and itself
    own = varlen_attention(q[[0, 1]], k[[0, 1]], v[[0, 1]], torch.tensor([0, 2], dtype=torch.int32), 2, causal=True, backend="sdpa")
    torch.testing.assert_close(out[1], own[1], rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_reaches_a_dropped_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], requires_grad=True)
    masked_varlen_attention(q, k, v, keep, torch.tensor([0, 6], dtype=torch.int32)).square().sum().backward()
    assert keep.grad[1] != 0 and keep.grad[4] != 0
    assert keep.grad[5] == 0  # the last key is seen by no other query


def test_lm_loss_alone_gives_the_predictors_gradient():
    torch.manual_seed(0)
    cfg = tiny_cfg(output_text_len_for_training=2)
    model = VLM(cfg).train()
    sparsifier = model.llm.layers["1"].sparsifier
    vision_logits = []

    def capture(module, args, out: torch.Tensor) -> None:
        out.retain_grad()
        vision_logits.append(out)

    sparsifier.vision.register_forward_hook(capture)
    batch = dummy_batch(cfg, [6, 9], [3, 2], token_cap=48, vit_cap=6)
    logits, keep = split_output(model(batch), cfg.sparsify)
    assert keep.shape == (1, 48) and logits.shape == (1, 48, cfg.llm.vocab_size)
    spans = find_spans(batch, cfg.image_context_id)
    dropped = keep[0, spans.vision].detach() == 0
    assert dropped.any() and not dropped.all()
    torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch.input_ids[0, 1:]).backward()
    # through the masked attention and the straight-through estimator, every dropped image token's logits
    # get a gradient (an additive -inf mask would give none)
    assert (vision_logits[0].grad[dropped].abs().sum(dim=-1) > 0).all()
    assert sparsifier.vision.out[-1].weight.grad.abs().sum() > 0
    assert sparsifier.vision.embed[1].weight.grad.abs().sum() > 0
    assert sparsifier.output_text.net[-1].weight.grad.abs().sum() > 0


def test_a_predictor_with_nothing_to_decide_still_gets_a_zero_gradient():
    """DDP hangs when a parameter gets no gradient on one rank: in a micro-batch without long answers the
    output-text predictor must still be part of the graph, with exactly zero gradient, and change nothing."""
    torch.manual_seed(0)
    cfg = tiny_cfg(output_text_len_for_training=1000)  # no answer is long enough to be sparsified
    model = VLM(cfg).train()
    batch = dummy_batch(cfg, [6, 9], [3, 2], token_cap=48, vit_cap=6)
    logits, keep = split_output(model(batch), cfg.sparsify)
    torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch.input_ids[0, 1:]).backward()
    predictor = model.llm.layers["1"].sparsifier.output_text
    grads = [p.grad for p in predictor.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)
    spans = find_spans(batch, cfg.image_context_id)
    assert bool((keep[0, spans.output] == 1).all())  # no answer token dropped


def test_all_keep_masked_model_equals_the_plain_model():
    torch.manual_seed(0)
    plain = VLM(tiny_cfg(sparsify=False))
    cfg = tiny_cfg(instruct_text_predictor=True, output_text_len_for_training=1, instruct_text_len_for_training=1)
    masked = VLM(cfg).train()
    missing = masked.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".sparsifier." in n for n in missing)
    bias_predictors(masked, keep=True)
    batch = dummy_batch(cfg, [6, 9, 4], [3, 0, 2], token_cap=56, vit_cap=6)
    logits, keep = split_output(masked(batch), cfg.sparsify)
    assert bool((keep == 1).all())
    torch.testing.assert_close(logits, plain(batch), rtol=1e-5, atol=1e-5)


def test_block_chain_carries_the_mask_channel():
    cfg = tiny_cfg()
    model = VLM(cfg).eval()
    batch = dummy_batch(cfg, [5, 7], [2, 1], token_cap=40, vit_cap=4)
    x = batch.pixel_values
    for name, block in model.blocks():
        x = block(x, batch)
        if name.startswith("llm."):
            assert x.shape[-1] == boundary_width(name, cfg.llm.hidden, cfg.llm.vocab_size, cfg.sparsify), name
    torch.testing.assert_close(model(batch), x)
    with pytest.raises(ConfigError, match="keep-mask channel"):
        model.llm.layers["1"].sparsifier = None
        model.llm.layers["1"](torch.zeros(1, 40, cfg.llm.hidden), batch)


def _trained_kept_fractions(seed: int, steps: int = 80, draws: int = 100, **knobs) -> tuple[float, float]:
    """Train only the predictors of the tiny model on one batch for ``steps`` steps (Adam, lr decaying linearly to
    0, the Gumbel temperature annealed); return the mean kept fractions (vision, output text) over ``draws``
    sampled decisions afterwards."""
    torch.manual_seed(seed)
    cfg = tiny_cfg(output_text_len_for_training=8, **knobs)
    model = VLM(cfg).train()
    for name, p in model.named_parameters():
        p.requires_grad_(".sparsifier." in name)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    batch = dummy_batch(cfg, [14, 20, 12], [6, 8, 5], vit_cap=19, seed=1)
    for step in range(steps):
        set_temperature(model, gumbel_tau(step, steps))
        logits, keep = split_output(model(batch), cfg.sparsify)
        lm = torch.nn.functional.cross_entropy(logits[0, :-1], batch.input_ids[0, 1:])
        loss = keep_rate_loss(keep, batch, cfg.sparsify, cfg.image_context_id)
        opt.zero_grad()
        (lm + loss.loss).backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        kept = [keep_rate_loss(split_output(model(batch), cfg.sparsify)[1], batch, cfg.sparsify, cfg.image_context_id).kept
                for _ in range(draws)]
    return sum(k["vision"] for k in kept) / draws, sum(k["output_text"] for k in kept) / draws


def test_keep_rate_loss_drives_kept_fraction_to_target():
    """Each kind's kept fraction goes to its own target: vision 0.2 and output text 0.8 (both start near 0.5,
    so a lost rule or swapped targets fail). One run ends within about 0.03 (one std over seeds, measured on
    this model) of its target: the straight-through Gumbel decisions make training noisy, and a single run
    missed by 0.06 on CI (stop 32). The mean of four seeds has a std near 0.012."""
    runs = [_trained_kept_fractions(seed, output_text_keep_rate=0.8) for seed in range(4)]
    vision = sum(v for v, _ in runs) / len(runs)
    text = sum(t for _, t in runs) / len(runs)
    assert abs(vision - 0.2) < 0.05 and abs(text - 0.8) < 0.05, runs


def _packed(samples: list[tuple[list[int], list[int]]], pad: int) -> PackedBatch:
    ids = [t for s, _ in samples for t in s] + [0] * pad
    labels = [t for _, lab in samples for t in lab] + [-100] * pad
    lens = [len(s) for s, _ in samples] + ([pad] if pad else [])
    pos = [p for n in lens for p in range(n)]
    length = len(ids)
    return PackedBatch(
        input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), position_ids=torch.tensor([pos]),
        cu_seqlens=torch.tensor([0] + lens).cumsum(0).to(torch.int32), max_seqlen=max(lens),
        pixel_values=torch.zeros(1, 3, 56, 56), image_flags=torch.zeros(1, dtype=torch.long),
        loss_weight=torch.ones(1, length), sample_ids=torch.arange(len(samples)), num_samples=len(samples),
    )


def test_spans_inside_a_packed_micro_batch():
    I, N = 3, -100  # image-context id, unsupervised
    # sample 0: BOS, image x3, question, answer (2), question (2), answer (3) -> last answer = 3 tokens
    s0 = ([1, I, I, I, 10, 11, 12, 13, 14, 15, 16, 17], [N, N, N, N, N, 11, 12, N, N, 15, 16, 17])
    # sample 1: text only: BOS, question (2), answer (2)
    s1 = ([1, 20, 21, 22, 23], [N, N, N, 22, 23])
    # sample 2: BOS, text, image x2, text (2), answer (1)
    s2 = ([1, 30, I, I, 31, 32, 33], [N, N, N, N, N, N, 33])
    # sample 3: a prompt without answer: BOS, image x2, text (3)
    s3 = ([1, I, I, 40, 41, 42], [N] * 6)
    spans = find_spans(_packed([s0, s1, s2, s3], pad=4), image_context_id=I)
    where = lambda m: m.nonzero().flatten().tolist()  # noqa: E731
    assert where(spans.vision) == [1, 2, 3, 19, 20, 25, 26]
    assert where(spans.output) == [9, 10, 11, 15, 16, 23]
    assert where(spans.instruct) == [7, 8, 13, 14, 21, 22, 27, 28]  # sample 3's last token is always kept
    assert spans.sample.tolist() == [0] * 12 + [1] * 5 + [2] * 7 + [3] * 6 + [-1] * 4


def test_param_groups_and_freezing():
    """The training module's optimiser groups: predictors apart at their own lr / weight decay, vision frozen."""
    cfg = tiny_cfg()
    model = VLM(cfg)
    sp = cfg.sparsify
    groups = param_groups(model, OptimConfig(lr=5e-6, weight_decay=0.1, freeze=["vision"]), sp.predictor_lr, sp.predictor_weight_decay)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"predictors", "predictors_no_decay", "projector", "projector_no_decay", "llm", "llm_no_decay"}
    assert by_name["predictors"]["lr"] == 2e-4 and by_name["predictors"]["weight_decay"] == 0.0
    assert by_name["llm"]["lr"] == 5e-6 and by_name["llm"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    predictors = [id(p) for g in groups if g["name"].startswith("predictors") for p in g["params"]]
    assert sorted(predictors) == sorted(id(p) for n, p in model.named_parameters() if ".sparsifier." in n)
    assert not any(names[id(p)].startswith("vision.") for g in groups for p in g["params"])
    assert not any(p.requires_grad for p in model.vision.parameters())
    decayed = param_groups(VLM(cfg), OptimConfig(), predictor_lr=1e-3, predictor_weight_decay=0.01)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in decayed}["predictors"] == (1e-3, 0.01)
    with pytest.raises(ConfigError, match="optim.freeze"):
        OptimConfig(freeze=["vit"])



def test_predictor_flops_match_torch_flop_counter():
    cfg = SparsifyConfig(**SMALL_PREDICTOR)
    vision, text = VisionPredictor(48, cfg, "sdpa"), TextPredictor(48, cfg)
    with FlopCounterMode(display=False) as counter:  # two samples with 7 and 5 image tokens, 9 text tokens
        vision(torch.randn(12, 48), torch.tensor([0] * 7 + [2] * 5), 3)
        text(torch.randn(9, 48))
    assert predictor_flops(48, cfg, [7, 5], 9) == counter.get_total_flops()
    no_vision = SparsifyConfig(**SMALL_PREDICTOR, vision_predictor=False)
    assert predictor_flops(48, no_vision, [7, 5], 9) == predictor_flops(48, cfg, [], 9)


def test_config_round_trip_and_errors():
    cfg = tiny_cfg(vision_keep_rate=0.3)
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    assert model_config("tiny").sparsify == SparsifyConfig()
    with pytest.raises(ConfigError, match="sparse_layer"):
        tiny_cfg(sparse_layer=5)
    with pytest.raises(ConfigError, match="vision_keep_rate"):
        tiny_cfg(vision_keep_rate=0.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        tiny_cfg(keep_rate=0.3)


# ---- the mechanism as published: each test names the one-line bug it catches --------------------------------

I = 3  # the tiny model's image-context id
N = -100


def _sample(image: int, question: int, answer: int, first: int = 10) -> tuple[list[int], list[int]]:
    """BOS, ``image`` image tokens, ``question`` unsupervised text tokens, ``answer`` supervised tokens."""
    text = list(range(first, first + question + answer))
    ids = [1] + [I] * image + text
    return ids, [N] * (1 + image + question) + text[question:]


def _sparsifier(hidden: int = 48, **knobs) -> Sparsifier:
    torch.manual_seed(0)
    return Sparsifier(SparsifyConfig(enabled=True, **SMALL_PREDICTOR, **knobs), hidden, I, "sdpa")


def test_masked_attention_is_float32_under_bf16_autocast():
    """Bug caught: the .float() matmuls left to autocast, which runs them in bf16 (max error ~0.1)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(40, 4, 16) * 3, torch.randn(40, 2, 16) * 3, torch.randn(40, 2, 16)
    keep, cu = (torch.rand(40) > 0.3).float(), torch.tensor([0, 17, 40], dtype=torch.int32)
    reference = masked_varlen_attention(q, k, v, keep, cu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = masked_varlen_attention(q, k, v, keep, cu)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=1e-6)


def test_keep_mask_gradient_is_bounded_and_the_forward_unchanged():
    """A dropped key scoring far above every visible key: the output still ignores it exactly, and its
    keep-mask gradient stays within |v_j - out_i| per query (bug caught: an exponent cap far above 0
    gives 3.4e16)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 1, 8), torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    k[2] = q[3:].mean(0) * 40.0  # key 2 dominates every later query's scores
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], requires_grad=True)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out = masked_varlen_attention(q, k, v, keep, cu)
    kept = [0, 1, 3, 4, 5]
    sub = varlen_attention(q[kept], k[kept], v[kept], torch.tensor([0, 5], dtype=torch.int32), 5, causal=True, backend="sdpa")
    torch.testing.assert_close(out[kept], sub, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    bound = sum(float((v[2] - out[i].detach()).abs().sum()) for i in range(3, 6))
    assert 0 < abs(float(keep.grad[2])) <= bound + 1e-5, (float(keep.grad[2]), bound)


def test_masked_attention_gradients_equal_causal_attention_when_everything_is_kept():
    """The exponent cap sits exactly at each row's maximum: the gradient must still flow there (a cap
    applied with a strict inequality, or below 0, would change these gradients)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    masked = torch.autograd.grad(masked_varlen_attention(q, k, v, torch.ones(12), cu).square().sum(), (q, k, v))
    plain = torch.autograd.grad(varlen_attention(q, k, v, cu, 7, causal=True, backend="sdpa").square().sum(), (q, k, v))
    for a, b in zip(masked, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inference_keeps_the_highest_scoring_image_tokens_of_each_sample():
    """Bug caught: prefill keeps the lowest-scoring image tokens (a reversed top-k)."""
    assert topk_keep(torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, -1.0]), torch.tensor([0, 0, 0, 1, 1, 1]), 2, 0.5).tolist() \
        == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    sparsifier = _sparsifier(vision_keep_rate=0.25).eval()
    logits = []
    sparsifier.vision.register_forward_hook(lambda m, a, out: logits.append(out))
    batch = _packed([_sample(12, 3, 2), _sample(8, 2, 3, first=30)], pad=0)
    keep = sparsifier(torch.randn(1, batch.input_ids.shape[1], 48), batch)
    spans = find_spans(batch, I)
    image = spans.vision.nonzero().flatten()
    score = (logits[0][:, KEEP] - logits[0][:, DROP]).detach()
    for sample, n in ((0, 12), (1, 8)):
        mine = (spans.sample[image] == sample).nonzero().flatten()
        best = set(image[mine[score[mine].topk(n // 4).indices]].tolist())
        assert set(image[mine][keep[image[mine]] == 1].tolist()) == best


def test_vision_predictor_pools_each_sample_on_its_own():
    """Bug caught: the global half pooled over the whole packed micro-batch instead of per sample."""
    torch.manual_seed(0)
    predictor = VisionPredictor(48, SparsifyConfig(**SMALL_PREDICTOR), "sdpa")
    a, b = torch.randn(7, 48), torch.randn(5, 48) * 4 + 2
    alone = predictor(a, torch.zeros(7, dtype=torch.long), 1)
    packed = predictor(torch.cat([a, b]), torch.tensor([0] * 7 + [1] * 5), 2)
    torch.testing.assert_close(packed[:7], alone, rtol=1e-5, atol=1e-5)


def test_training_sparsifies_only_long_answers_of_image_samples():
    """Bugs caught: the short-answer gate removed (an answer under output_text_len_for_training tokens is
    sparsified in training) and a text-only sample's answer sparsified (the original applies the
    output-text mask only where the vision predictor ran)."""
    sparsifier = _sparsifier(output_text_len_for_training=6).train()
    for predictor in (sparsifier.vision, sparsifier.output_text):  # drop everything they decide on
        predictor_last = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]
        predictor_last.bias.data = torch.tensor([-100.0, 100.0])
    samples = [_sample(4, 2, 8), _sample(4, 2, 3, first=30), _sample(0, 2, 8, first=50)]
    batch = _packed(samples, pad=2)
    keep = sparsifier(torch.randn(1, batch.input_ids.shape[1], 48), batch)
    spans = find_spans(batch, I)
    answer_keep = [keep[spans.output & (spans.sample == s)].tolist() for s in range(3)]
    assert answer_keep == [[0.0] * 8, [1.0] * 3, [1.0] * 8]
    assert keep[spans.vision].sum() == 0


def test_keep_rate_loss_averages_over_every_answer_short_ones_counting_zero():
    """The original's normalisation: the output-text penalty is a mean over the batch's answers, a short
    (unsparsified) one counting 0. Bug caught: a mean over the long answers only (4x here)."""
    cfg = SparsifyConfig(enabled=True, **SMALL_PREDICTOR, output_text_len_for_training=6, mask_loss_weight=10.0)
    samples = [_sample(4, 2, 8), _sample(4, 2, 3, first=30), _sample(4, 1, 2, first=40), _sample(4, 2, 4, first=50),
               _sample(0, 2, 9, first=60)]  # the text-only sample's answer is not sparsified: not counted
    batch = _packed(samples, pad=0)
    spans = find_spans(batch, I)
    keep = torch.ones(batch.input_ids.shape[1])
    keep[spans.vision & (spans.sample == 0)] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # sample 0 keeps 1 of 4
    keep[(spans.output & (spans.sample == 0)).nonzero().flatten()[:6]] = 0.0  # and 2 of its 8 answer tokens
    result = keep_rate_loss(keep, batch, cfg, I)
    vision = ((0.2 - 0.25) ** 2 + 3 * (0.2 - 1.0) ** 2) / 4
    output = (0.5 - 0.25) ** 2 / 4
    assert float(result.loss) == pytest.approx(10.0 * (vision + output), rel=1e-6)
    assert result.kept == pytest.approx({"vision": (0.25 + 3) / 4, "output_text": 0.25})


# ---- the original checkpoints' predictor names ---------------------------------------------------------------

def _original_predictor_shapes(hidden: int, d: int, mlp: int, blocks: int, text: tuple[str, ...]) -> dict[str, tuple]:
    """Every predictor tensor of an original Dynamic-LLaVA checkpoint with its shape, written out from the
    original's modules (VisionPredictor: down_mlp, timm-style blocks without qkv bias, output_mlp;
    TextPredictor: output_mlp)."""
    v = "model.image_score_predictor."
    shapes = {f"{v}down_mlp.0.weight": (hidden,), f"{v}down_mlp.0.bias": (hidden,), f"{v}down_mlp.1.weight": (d, hidden),
              f"{v}down_mlp.1.bias": (d,)}
    for i in range(blocks):
        b = f"{v}transformer.{i}."
        shapes.update({f"{b}norm1.weight": (d,), f"{b}norm1.bias": (d,), f"{b}attn.qkv.weight": (3 * d, d),
                       f"{b}attn.proj.weight": (d, d), f"{b}attn.proj.bias": (d,), f"{b}norm2.weight": (d,),
                       f"{b}norm2.bias": (d,), f"{b}mlp.fc1.weight": (mlp, d), f"{b}mlp.fc1.bias": (mlp,),
                       f"{b}mlp.fc2.weight": (d, mlp), f"{b}mlp.fc2.bias": (d,)})
    head = [(d, d // 2), (d // 2, d // 4), (d // 4, 2)]
    for k, (i, o) in zip((0, 2, 4), head):
        shapes.update({f"{v}output_mlp.{k}.weight": (o, i), f"{v}output_mlp.{k}.bias": (o,)})
    for name in text:
        t = f"model.{name}."
        shapes.update({f"{t}output_mlp.0.weight": (hidden,), f"{t}output_mlp.0.bias": (hidden,)})
        for k, (i, o) in zip((1, 3, 5, 7), [(hidden, d), *head]):
            shapes.update({f"{t}output_mlp.{k}.weight": (o, i), f"{t}output_mlp.{k}.bias": (o,)})
    return shapes


def _original_vision_forward(w: dict, x: torch.Tensor, heads: int, blocks: int) -> torch.Tensor:
    """The original VisionPredictor's forward for one image ([n, hidden] -> [n, 2]), from its weights."""
    F, v = torch.nn.functional, "model.image_score_predictor."

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    def lin(h, name):
        return F.linear(h, w[f"{name}.weight"], w.get(f"{name}.bias"))

    h = F.gelu(lin(ln(x, f"{v}down_mlp.0"), f"{v}down_mlp.1"))
    n, d = h.shape
    for i in range(blocks):
        b = f"{v}transformer.{i}."
        q, k, vv = lin(ln(h, f"{b}norm1"), f"{b}attn.qkv").reshape(n, 3, heads, d // heads).permute(1, 2, 0, 3)
        h = h + lin(F.scaled_dot_product_attention(q, k, vv).transpose(0, 1).reshape(n, d), f"{b}attn.proj")
        h = h + lin(F.gelu(lin(ln(h, f"{b}norm2"), f"{b}mlp.fc1")), f"{b}mlp.fc2")
    h = torch.cat([h[:, : d // 2], h[:, d // 2:].mean(0, keepdim=True).expand(n, -1)], dim=-1)
    return lin(F.gelu(lin(F.gelu(lin(h, f"{v}output_mlp.0")), f"{v}output_mlp.2")), f"{v}output_mlp.4")


def test_original_predictor_weights_load_one_to_one_and_export_back():
    """A state dict in the original checkpoints' names (every key written out from the original's modules)
    loads with no missing or unexpected key, computes what the original computes, and exports unchanged."""
    model = VLM(tiny_cfg(instruct_text_predictor=True))
    hidden = model.cfg.llm.hidden
    shapes = _original_predictor_shapes(hidden, 32, 64, 2, ("output_text_score_predictor", "instruct_score_predictor"))
    torch.manual_seed(0)
    state = {k: torch.randn(s) * 0.3 for k, s in shapes.items()}
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(1)  # not a predictor: ignored
    load_original_predictors(model, state)
    exported = original_predictor_state_dict(model)
    assert set(exported) == set(shapes) and all(torch.equal(exported[k], state[k]) for k in shapes)
    sparsifier = model.llm.layers["1"].sparsifier
    x = torch.randn(9, hidden)
    torch.testing.assert_close(sparsifier.vision(x, torch.zeros(9, dtype=torch.long), 1),
                               _original_vision_forward(state, x, heads=4, blocks=2), rtol=1e-5, atol=1e-5)
    without_instruct = VLM(tiny_cfg())
    with pytest.raises(ConfigError, match=r"unexpected \['model.instruct_score_predictor"):
        load_original_predictors(without_instruct, state)


def test_hf_checkpoint_with_original_predictor_names_loads_them(tmp_path):
    """A checkpoint folder holding Dynamic-LLaVA predictors under the original names: load_hf_weights fills a
    sparsified model's predictors from it (a dense model would report them as unexpected keys)."""
    from safetensors.torch import save_file

    from omnibal_pl.model.hf_loading import load_hf_weights
    from tests.helpers import internvl_model, write_internvl_checkpoint

    dense = internvl_model("Qwen2ForCausalLM")
    write_internvl_checkpoint(dense, tmp_path, "Qwen2ForCausalLM", shards=1)
    cfg = VLMConfig.from_dict({**dense.cfg.to_dict(), "sparsify": {"enabled": True, **SMALL_PREDICTOR}})
    source = VLM(cfg)
    predictors = original_predictor_state_dict(source)
    save_file({k: t.contiguous() for k, t in predictors.items()}, tmp_path / "predictors.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"].update({k: "predictors.safetensors" for k in predictors})
    index.write_text(json.dumps(meta))
    torch.manual_seed(7)
    target = VLM(cfg)
    load_hf_weights(target, tmp_path)
    assert all(torch.equal(t, original_predictor_state_dict(target)[k]) for k, t in predictors.items())
    with pytest.raises(ConfigError, match="unexpected keys"):
        load_hf_weights(VLM(dense.cfg), tmp_path)
