"""Tiny HuggingFace configs for the zoo tests, built offline from config objects."""

from __future__ import annotations

import torch
import transformers as T

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def _text(cls_config, model_cls, **extra):
    return lambda: model_cls(cls_config(**{**TEXT, **extra}))


def _ids(batch=2, seq=7):
    return torch.randint(3, 99, (batch, seq))


def _vision(size=32, channels=3):
    return lambda g: {"pixel_values": torch.randn(2, channels, size, size, generator=g)}


def _text_inputs(g):
    return {"input_ids": torch.randint(3, 99, (2, 7), generator=g)}


def _seq2seq_inputs(g):
    return {"input_ids": torch.randint(3, 99, (2, 7), generator=g),
            "decoder_input_ids": torch.randint(3, 99, (2, 5), generator=g)}


def _clip_inputs(g):
    return {"input_ids": torch.randint(3, 99, (2, 7), generator=g),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=37)

# name -> (build, make inputs from a generator, batch key, specs to check); OUTPUT names the output to
# compare where the first one mixes samples by design (CLIP's similarity matrix)
OUTPUT = {"clip": "text_embeds"}

MODELS = {
    "bert": (_text(T.BertConfig, T.BertModel), _text_inputs, "input_ids", ("rms", "bert_ln")),
    "roberta": (_text(T.RobertaConfig, T.RobertaModel), _text_inputs, "input_ids", ("rms", "bert_ln")),
    "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4,
                                                                 hidden_dim=37, max_position_embeddings=64)),
                   _text_inputs, "input_ids", ("rms", "bert_ln")),
    "albert": (_text(T.AlbertConfig, T.AlbertModel, embedding_size=16), _text_inputs, "input_ids",
               ("rms", "bert_ln")),
    "electra": (_text(T.ElectraConfig, T.ElectraModel, embedding_size=16), _text_inputs, "input_ids",
                ("rms", "bert_ln")),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
             _text_inputs, "input_ids", ("rms", "bert_ln")),
    "llama": (_text(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2), _text_inputs, "input_ids", ("ln",)),
    "mistral": (_text(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2), _text_inputs, "input_ids",
                ("ln",)),
    "t5": (lambda: T.T5Model(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
           _seq2seq_inputs, "input_ids", ("ln",)),
    "bart": (lambda: T.BartModel(T.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                              encoder_attention_heads=4, decoder_attention_heads=4,
                                              encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)),
             _seq2seq_inputs, "input_ids", ("rms", "bert_ln")),
    "vit": (lambda: T.ViTModel(T.ViTConfig(**VIT)), _vision(), "pixel_values", ("rms", "bert_ln")),
    "deit": (lambda: T.DeiTModel(T.DeiTConfig(**VIT)), _vision(), "pixel_values", ("rms", "bert_ln")),
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                              num_heads=[2, 2], window_size=4)),
             _vision(), "pixel_values", ("rms", "bert_ln")),
    "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
                 _vision(), "pixel_values", ("rms", "bert_ln")),
    "resnet": (lambda: T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])),
               _vision(), "pixel_values", ("gn_ws", "gn", "ghost_bn")),
    "regnet": (lambda: T.RegNetModel(T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                    groups_width=8)),
               _vision(), "pixel_values", ("gn_ws",)),
    "mobilenet_v2": (lambda: T.MobileNetV2Model(T.MobileNetV2Config(image_size=32, depth_multiplier=0.25)),
                     _vision(), "pixel_values", ("gn_ws",)),
    # beyond the list the issue names: more families that people convert
    "qwen2": (_text(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2), _text_inputs, "input_ids", ("ln",)),
    "gemma": (_text(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=2, head_dim=8), _text_inputs,
              "input_ids", ("ln",)),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=37, max_position_embeddings=64,
                                                 word_embed_proj_dim=32)),
            _text_inputs, "input_ids", ("rms", "bert_ln")),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4)),
               _vision(), "pixel_values", ("rms", "bert_ln")),
    "convnextv2": (lambda: T.ConvNextV2Model(T.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
                   _vision(), "pixel_values", ("rms", "bert_ln")),
    "mobilevit": (lambda: T.MobileViTModel(T.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                                                             neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32])),
                  _vision(64), "pixel_values", ("gn_ws",)),
    "efficientnet": (lambda: T.EfficientNetModel(T.EfficientNetConfig(image_size=32, width_coefficient=0.25,
                                                                      depth_coefficient=0.2, hidden_dim=320)),
                     _vision(), "pixel_values", ("gn_ws",)),
    "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        decoder_hidden_size=16, strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2])),
        _vision(), "pixel_values", ("gn_ws",)),
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37))),
        _clip_inputs, "input_ids", ("rms", "bert_ln")),
}
