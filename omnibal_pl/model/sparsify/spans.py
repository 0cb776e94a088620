"""Which tokens of a packed micro-batch each predictor may drop: :class:`Spans` and :func:`find_spans`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from omnibal_pl.batch import IGNORE_INDEX, PackedBatch


@dataclass
class Spans:
    """Per-token membership of one packed micro-batch of length ``L``.

    ``sample`` [L] int64: packed sample index of each token, -1 on padding. ``vision``, ``instruct``,
    ``output`` [L] bool: image tokens, last instruction, last answer of each sample (disjoint).
    """

    sample: torch.Tensor
    vision: torch.Tensor
    instruct: torch.Tensor
    output: torch.Tensor
    num_samples: int


def find_spans(batch: PackedBatch, image_context_id: int) -> Spans:
    """Spans from the batch's own metadata, per sample (segment ``k < num_samples`` of ``cu_seqlens``).

    - vision: ``input_ids == image_context_id``;
    - output: the last run of ``labels != -100`` (the last assistant answer with its end marker);
    - instruct: the non-image, unsupervised tokens after the sample's last image token and previous
      answer and before the last answer (without an answer: before the sample's last token, which
      is always kept so a prompt's next-token logits exist); each sample's first token (BOS) is excluded.
    Runs on the CPU; the masks come back on the batch's device. Host syncs (allowed, documented: only with
    sparsification on): one copy each of ``input_ids`` and ``labels`` to the host per call; the segment
    bounds come from the batch's host ``seqlens`` (no device read).
    """
    ids = batch.input_ids[0].cpu()
    answer = batch.labels[0].cpu() != IGNORE_INDEX
    length = ids.shape[0]
    image = ids == image_context_id
    sample = torch.full((length,), -1, dtype=torch.long)
    output = torch.zeros(length, dtype=torch.bool)
    instruct = torch.zeros(length, dtype=torch.bool)
    bounds = batch.bounds
    for k in range(batch.num_samples):
        s, e = bounds[k], bounds[k + 1]
        sample[s:e] = k
        ans = answer[s:e]
        hits = ans.nonzero().flatten()
        if len(hits):
            end = int(hits[-1]) + 1
            gaps = (~ans[:end]).nonzero().flatten()
            start = int(gaps[-1]) + 1 if len(gaps) else 0
            output[s + start:s + end] = True
        else:
            start = e - s - 1
        before = torch.arange(start)
        stops = before[image[s:s + start] | ans[:start]]
        first = max(int(stops[-1]) + 1 if len(stops) else 0, 1)
        instruct[s + first:s + start] = True
    valid = sample >= 0
    device = batch.input_ids.device
    return Spans(sample.to(device), (image & valid).to(device), instruct.to(device), output.to(device), batch.num_samples)


def span_lengths(span: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Tokens of ``span`` ([L] bool, one of ``spans``' masks or a subset) per sample: [num_samples] int64."""
    return torch.bincount(spans.sample[span], minlength=spans.num_samples)


def text_spans_of_image_samples(spans: Spans) -> Spans:
    """``spans`` with the instruction and answer spans kept only in samples that have image tokens.

    Dynamic-LLaVA applies its text masks only where the vision predictor ran (its training data are image
    samples); with the vision predictor on, a text-only sample's text is therefore never sparsified (in
    training, in the keep-rate loss and when decoding).
    """
    has_image = torch.bincount(spans.sample[spans.vision], minlength=spans.num_samples) > 0
    in_image_sample = has_image[spans.sample.clamp_min(0)] & (spans.sample >= 0)
    return dataclasses.replace(spans, instruct=spans.instruct & in_image_sample, output=spans.output & in_image_sample)
