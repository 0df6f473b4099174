"""Block plans: found by introspection for every supported family, overridable, with clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layermerge.blocks import BlockPlan, BlockPlanError, find_block_plan
from layermerge.errors import ConfigError, LayermergeError

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2)
FAMILY_CONFIGS = {
    "bert": dict(model_type="bert", **TEXT),
    "roberta": dict(model_type="roberta", **TEXT, pad_token_id=1),
    "distilbert": dict(model_type="distilbert", vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                       max_position_embeddings=64),
    "vit": dict(model_type="vit", image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                num_hidden_layers=3, num_attention_heads=4, intermediate_size=37),
    "gpt2": dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "llama": dict(model_type="llama", **DECODER),
    "qwen2": dict(model_type="qwen2", **DECODER),
    "mistral": dict(model_type="mistral", **DECODER),
}
# family -> (blocks prefix, block class, embedding, head)
EXPECTED = {
    "bert": ("encoder.layer", "BertLayer", ["embeddings"], ["pooler"]),
    "roberta": ("encoder.layer", "RobertaLayer", ["embeddings"], ["pooler"]),
    "distilbert": ("transformer.layer", "TransformerBlock", ["embeddings"], []),
    "vit": ("layers", "ViTLayer", ["embeddings"], ["layernorm", "pooler"]),
    "gpt2": ("h", "GPT2Block", ["wte", "wpe"], ["ln_f"]),
    "llama": ("layers", "LlamaDecoderLayer", ["embed_tokens"], ["norm"]),
    "qwen2": ("layers", "Qwen2DecoderLayer", ["embed_tokens"], ["norm"]),
    "mistral": ("layers", "MistralDecoderLayer", ["embed_tokens"], ["norm"]),
}


def tiny_model(family: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.for_model(**FAMILY_CONFIGS[family]))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_plan_found_for_transformers_families(family):
    model = tiny_model(family)
    plan = find_block_plan(model)
    prefix, block_class, embedding, head = EXPECTED[family]
    assert plan.blocks == tuple(f"{prefix}.{i}" for i in range(3))
    assert plan.block_class == block_class
    assert list(plan.embedding) == embedding
    assert list(plan.head) == head
    assert plan.source == "introspection"
    # Every state-dict key is in exactly one block or outside all of them, and block keys carry their prefix.
    keys = list(model.state_dict())
    for index in range(3):
        block_keys = plan.block_keys(keys, index)
        expected = [k for k in keys if k.startswith(f"{prefix}.{index}.")]
        assert block_keys == expected and block_keys
        assert all(plan.block_of_key(k) == index for k in block_keys)
    non_block = plan.non_block_keys(keys)
    assert sorted(non_block + [k for i in range(3) for k in plan.block_keys(keys, i)]) == sorted(keys)
    roots = {p.split(".")[0] for p in embedding + head}
    assert non_block and all(k.split(".")[0] in roots for k in non_block)


def test_plan_found_for_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=37))
    plan = find_block_plan(model)
    assert plan.blocks == ("encoder.layers.0", "encoder.layers.1")
    assert plan.block_class == "CLIPEncoderLayer"
    assert plan.embedding == ("embeddings", "pre_layrnorm")
    assert plan.head == ("post_layernorm",)


def test_plan_found_for_efficientnet_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    plan = find_block_plan(model)
    assert plan.blocks == tuple(f"_blocks.{i}" for i in range(len(model._blocks)))
    assert len(plan) == 16 and plan.block_class == "MBConvBlock"
    assert plan.embedding == ("_conv_stem", "_bn0")
    assert plan.head == ("_conv_head", "_bn1", "_fc")
    keys = list(model.state_dict())
    assert plan.block_of_key("_blocks.12._bn1.running_mean") == 12
    assert plan.block_of_key("_blocks.1._bn1.weight") == 1     # "_blocks.1." does not capture "_blocks.12."
    assert set(plan.non_block_keys(keys)) == {k for k in keys if not k.startswith("_blocks.")}


def test_task_model_plan_carries_the_task_prefix():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**FAMILY_CONFIGS["bert"]))
    plan = find_block_plan(model)
    assert plan.blocks[0] == "bert.encoder.layer.0"
    assert plan.embedding == ("bert.embeddings",)
    assert plan.head == ("bert.pooler", "classifier")


class Custom(nn.Module):
    """A model the introspection cannot read: its blocks are separate attributes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.second(self.first(self.stem(x))))


def test_no_plan_error_explains_the_override():
    with pytest.raises(BlockPlanError) as info:
        find_block_plan(Custom())
    message = str(info.value)
    assert isinstance(info.value, LayermergeError)
    assert "Custom" in message and "block_plan" in message
    assert "blocks: encoder.layer" in message and "embedding:" in message and "head:" in message


def test_override_on_custom_module():
    model = Custom()
    plan = find_block_plan(model, {"embedding": ["stem"], "blocks": ["first", "second"], "head": ["out"]})
    assert plan == BlockPlan(("stem",), ("first", "second"), ("out",), "override", "Linear/Sequential")
    keys = list(model.state_dict())
    assert plan.block_keys(keys, 1) == ["second.0.weight", "second.0.bias"]
    assert plan.non_block_keys(keys) == ["stem.weight", "stem.bias", "out.weight", "out.bias"]


def test_override_with_container_path():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 1))
    plan = find_block_plan(model, {"blocks": "1", "embedding": "0", "head": ["2"]})
    assert plan.blocks == ("1.0", "1.1") and plan.embedding == ("0",) and plan.head == ("2",)


@pytest.mark.parametrize("override, fragment", [
    ({"blocks": ["first", "missing"]}, "no module 'missing'"),
    ({"blocks": ["first"], "head": ["nope.x"]}, "'head'"),
    ({"blocks": "stem"}, "not a non-empty nn.ModuleList"),
    ({"embedding": ["stem"]}, "needs either 'blocks'"),
    ({"blocks": ["first"], "layers": ["x"]}, "unknown key(s) ['layers']"),
    ({"blocks": ["second", "second.0"]}, "overlap"),
])
def test_override_is_validated(override, fragment):
    with pytest.raises(ConfigError) as info:
        find_block_plan(Custom(), override)
    assert fragment in str(info.value)


def test_ambiguous_stacks_need_an_override():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.right = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(BlockPlanError, match="ambiguous.*'left'.*'right'|ambiguous.*'right'.*'left'"):
        find_block_plan(TwoTowers())
    assert find_block_plan(TwoTowers(), {"blocks": "right"}).blocks == ("right.0", "right.1")


def test_nested_lists_pick_the_outer_stack():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    model = nn.Module()
    model.stages = nn.ModuleList(Stage() for _ in range(2))
    assert find_block_plan(model, granularity="stage").blocks == ("stages.0", "stages.1")
    layered = find_block_plan(model)            # the default: each stage's layers, each stage a stack
    assert layered.blocks == tuple(f"stages.{s}.inner.{i}" for s in range(2) for i in range(5))
    assert layered.stack_starts == (0, 5)
    assert torch.is_tensor(next(model.parameters()))


def test_stacks_override_gives_one_stream_per_stack():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.right = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    plan = find_block_plan(TwoTowers(), {"stacks": ["left", ["right.0", "right.1", "right.2"]]})
    assert plan.blocks == ("left.0", "left.1", "right.0", "right.1", "right.2")
    assert plan.stack_starts == (0, 2) and plan.stacks == 2
    assert [plan.stack_of(i) for i in range(5)] == [0, 0, 1, 1, 1]
    assert list(plan.stack_blocks(1)) == [2, 3, 4]
    assert [plan.starts_stack(i) for i in range(5)] == [False, False, True, False, False]
    with pytest.raises(ConfigError, match="either 'blocks'"):
        find_block_plan(TwoTowers(), {"blocks": "left", "stacks": ["right"]})
    with pytest.raises(ConfigError, match="one entry per stack"):
        find_block_plan(TwoTowers(), {"stacks": "left"})


@pytest.mark.parametrize("config, encoder, decoder", [
    (dict(model_type="t5", vocab_size=99, d_model=16, d_kv=4, d_ff=20, num_layers=2, num_decoder_layers=3,
          num_heads=4), "encoder.block", "decoder.block"),
    (dict(model_type="bart", vocab_size=99, d_model=16, encoder_layers=2, decoder_layers=3,
          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=20, decoder_ffn_dim=20,
          max_position_embeddings=32), "encoder.layers", "decoder.layers"),
])
def test_encoder_decoder_models_get_two_stacks(config, encoder, decoder):
    """The model says which stack is its encoder: its blocks come first, then the decoder's, each its own stream."""
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.for_model(**config))
    plan = find_block_plan(model)
    assert plan.blocks == (f"{encoder}.0", f"{encoder}.1", f"{decoder}.0", f"{decoder}.1", f"{decoder}.2")
    assert plan.stack_starts == (0, 2)
    assert "shared" in plan.embedding and not any(p.startswith(("encoder.block", "decoder.block")) for p in plan.head)


@pytest.mark.parametrize("config, stages, layers", [
    (dict(model_type="swin", image_size=32, patch_size=4, embed_dim=16, depths=[2, 3], num_heads=[2, 4],
          window_size=4), "encoder.layers", "blocks"),
    (dict(model_type="convnext", hidden_sizes=[8, 16], depths=[2, 3], num_stages=2), "encoder.stages", "layers"),
    (dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[2, 3], layer_type="basic"),
     "encoder.stages", "layers"),
])
def test_hierarchical_models_get_one_block_per_layer_by_default(config, stages, layers):
    """Memory is one layer, not one stage: every layer a block, every stage its own stack (what runs between
    stages, patch merging or downsampling, is captured for real); granularity 'stage' keeps whole stages."""
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.for_model(**config))
    plan = find_block_plan(model)
    assert plan.blocks == (f"{stages}.0.{layers}.0", f"{stages}.0.{layers}.1", f"{stages}.1.{layers}.0",
                           f"{stages}.1.{layers}.1", f"{stages}.1.{layers}.2")
    assert plan.stack_starts == (0, 2)
    coarse = find_block_plan(model, granularity="stage")
    assert coarse.blocks == (f"{stages}.0", f"{stages}.1") and coarse.stack_starts == (0,)
    with pytest.raises(ConfigError, match="granularity"):
        find_block_plan(model, granularity="row")


def test_flat_stacks_are_the_same_at_either_granularity():
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.for_model(model_type="vit", image_size=16, patch_size=4, hidden_size=16,
                                                       num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=20))
    assert find_block_plan(model) == find_block_plan(model, granularity="stage")
