"""DETR with named taps: the forward returns the requested intermediate tensors, batch-first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

import torch
from torch import nn

from invcache import taps as T
from invcache.models.backbone import Backbone
from invcache.models.config import DetrConfig
from invcache.models.position import sine_position_encoding
from invcache.models.transformer import Transformer


class DetrPredictions(TypedDict):
    """One decoder layer's predictions, under the official DETR's names.

    ``pred_logits`` (B, Q, num_classes + 1), the last class being no-object; ``pred_boxes``
    (B, Q, 4), sigmoid (cx, cy, w, h) normalized to the image.
    """

    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor


class DetrOutputs(DetrPredictions, total=False):
    """The official ``DETR.forward`` result with ``aux_loss=True``: the last layer's predictions and,
    in ``aux_outputs``, those of decoder layers 1..L-1 (in order), which the auxiliary losses read."""

    aux_outputs: list[DetrPredictions]


class MLP(nn.Module):
    """DETR's box head: Linear layers with ReLU between them (keys ``layers.{0,1,2}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DETR(nn.Module):
    """The official DETR architecture; its ``state_dict`` keys are those of facebookresearch/detr."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        # A one-element list reproduces the official key prefix ``backbone.0.body``.
        self.backbone = nn.ModuleList([Backbone(config.backbone, config.dilation)])
        self.input_proj = nn.Conv2d(config.backbone_channels, config.d_model, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)
        self.transformer = Transformer(
            config.d_model, config.nhead, config.num_encoder_layers, config.num_decoder_layers,
            config.dim_feedforward,
        )
        self.class_embed = nn.Linear(config.d_model, config.num_classes + 1)
        self.bbox_embed = MLP(config.d_model, config.d_model, 4, 3)

    def position_encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        # Computed per call, not cached on the module: a tensor made under inference mode could
        # not take part in a later training forward, and the encoding costs next to nothing.
        return sine_position_encoding(height, width, self.config.d_model // 2, device=device)

    def forward(self, images: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
        """Run DETR on normalized images (B, 3, H, W) and return the requested taps.

        Each tap is batch-first with the per-image shape of SPEC §1. The pass stops after the
        last requested tap: asking only for ``enc.*`` never runs the decoder. ``input`` is not
        computed by the model (the data pipeline provides it) and is refused here.
        """
        wanted = set(taps)
        valid = set(self.config.taps()) - set(T.DATA_TAPS)
        unknown = wanted - valid
        if unknown:
            raise ValueError(f"taps not computed by the model: {sorted(unknown)}; valid: {sorted(valid)}")
        cfg = self.config
        head_wanted = bool(wanted & {T.HEAD_LOGITS, T.HEAD_BOXES})
        enc_ks = [T.layer_index(t) for t in wanted if t.startswith("enc.")]
        dec_ks = [T.layer_index(t) for t in wanted if t.startswith("dec.")]
        decoder_layers = cfg.num_decoder_layers if head_wanted else max(dec_ks, default=0)
        encoder_layers = cfg.num_encoder_layers if decoder_layers else max(enc_ks, default=-1)

        out: dict[str, torch.Tensor] = {}
        c5 = self.backbone[0](images)
        if T.BACKBONE_C5 in wanted:
            out[T.BACKBONE_C5] = c5.flatten(2).transpose(1, 2)
        if encoder_layers < 0:
            return out

        src = self.input_proj(c5)
        pos = self.position_encoding(src.shape[2], src.shape[3], src.device).unsqueeze(0)
        memory = src.flatten(2).transpose(1, 2)
        if T.enc(0) in wanted:
            out[T.enc(0)] = memory
        for k, layer in enumerate(self.transformer.encoder.layers[:encoder_layers], start=1):
            memory = layer(memory, pos)
            if T.enc(k) in wanted:
                out[T.enc(k)] = memory
        if not decoder_layers:
            return out

        batch = images.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos, dtype=memory.dtype)
        decoder = self.transformer.decoder
        for k, layer in enumerate(decoder.layers[:decoder_layers], start=1):
            tgt = layer(tgt, memory, pos, query_pos)
            if T.dec(k) in wanted or (head_wanted and k == decoder_layers):
                out[T.dec(k)] = decoder.norm(tgt)
        if head_wanted:
            embedding = out[T.dec(decoder_layers)]
            if T.dec(decoder_layers) not in wanted:
                del out[T.dec(decoder_layers)]
            if T.HEAD_LOGITS in wanted:
                out[T.HEAD_LOGITS] = self.class_embed(embedding)
            if T.HEAD_BOXES in wanted:
                out[T.HEAD_BOXES] = self.bbox_embed(embedding).sigmoid()
        return out

    def detection_outputs(self, images: torch.Tensor) -> DetrOutputs:
        """Predictions of every decoder layer for DETR's detection loss (:mod:`invcache.models.loss`).

        The official DETR's training output (``aux_loss=True``): the class and box heads applied
        to each decoder layer's output after the decoder's final LayerNorm (the taps ``dec.1..dec.L``),
        the normed state never being fed back into the next layer. Built on the tap forward, with
        the heads applied layer by layer (the official code applies them to the stacked layers,
        the same arithmetic), so ``pred_logits``/``pred_boxes`` are bitwise the ``head.*`` taps;
        gradients flow through it.
        """
        return self.predictions(self(images, [T.dec(k) for k in range(1, self.config.num_decoder_layers + 1)]))

    def predictions(self, taps: Mapping[str, torch.Tensor]) -> DetrOutputs:
        """:meth:`detection_outputs` from the taps ``dec.1..dec.L`` of a forward already run (a caller that
        also needs a decoder embedding, such as the trade-off fine-tuning, runs one forward for both)."""
        predictions = [DetrPredictions(pred_logits=self.class_embed(taps[T.dec(k)]),
                                       pred_boxes=self.bbox_embed(taps[T.dec(k)]).sigmoid())
                       for k in range(1, self.config.num_decoder_layers + 1)]
        return DetrOutputs(**predictions[-1], aux_outputs=predictions[:-1])
