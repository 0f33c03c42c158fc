"""PEFT exchange for every family, against real transformers + peft.

For each family in `tests/family_cases.py` with a transformers side, a tiny
random transformers model (grouped-query attention: 4 query heads, 2
key/value heads; Qwen2 with its query/key/value biases) is saved with
`save_pretrained` and loaded into keras-hub by keras-hub's own converter
(`from_preset(dir)`, offline). Adapters then go both ways: PEFT's
`save_pretrained` -> `import_peft`, and `inject_lora` -> `export_peft` ->
`PeftModel.from_pretrained`, for the default q+v targets, all seven
projections (rsLoRA), a rank/alpha pattern with regex `target_modules`, and
a block subset (`layers_to_transform`); logits agree within 1e-4.

keras-hub's Mistral converter rounds every weight to float16. The tiny
models here are given float16-representable weights, so that rounding is
exact and every family's base logits are compared directly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import peft  # noqa: E402
import transformers  # noqa: E402

from keras_lora import inject_lora, lora_layers, merge_lora  # noqa: E402
from keras_lora.interop import export_hf_model, export_peft, import_peft  # noqa: E402
from tests.family_cases import CASES  # noqa: E402
from tests.helpers import randomize_lora_b, snapshot  # noqa: E402
from tests.peft_helpers import Side, save_tiny_model  # noqa: E402

ATOL = 1e-4
HF_CASES = [case for case in CASES if case.hf_config is not None]


@pytest.fixture(scope="module", params=HF_CASES, ids=lambda case: case.id)
def side(request, tmp_path_factory):
    case = request.param
    return Side(case, save_tiny_model(case, tmp_path_factory.mktemp(case.id)))


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)


def assert_adapter_matters(logits, base):
    # Far more than the tolerance: a dropped or misplaced factor shows.
    assert np.max(np.abs(logits - base)) > 100 * ATOL


def test_base_logits_match_transformers(side):
    assert_close(side.keras_logits(side.keras_lm()), side.hf_base)
    assert np.std(side.hf_base) > 0.1


# --- PEFT -> Keras ----------------------------------------------------------


def _import_configs(side) -> dict:
    """LoraConfig arguments per case, in this family's module names."""
    m = side.module
    all_modules = [m(role) for role in side.family.roles]
    query, down = m(side.family.roles[0]), m(side.family.roles[-1])
    return {
        "qv": dict(r=4, lora_alpha=8, target_modules=[m("query"), m("value")]),
        "all_rslora": dict(
            r=2, lora_alpha=6, target_modules=all_modules, use_rslora=True
        ),
        "pattern_regex": dict(
            r=4,
            lora_alpha=8,
            target_modules=rf".*\.({query}|{down}|{m('key')})",
            rank_pattern={query: 2},
            alpha_pattern={down: 3},
        ),
        "blocks": dict(
            r=3,
            lora_alpha=5,
            target_modules=[m("key"), m("attention_output"), m(side.family.roles[5])],
            layers_to_transform=[1],
        ),
    }


IMPORT_CASES = ["qv", "all_rslora", "pattern_regex", "blocks"]


@pytest.mark.parametrize("name", IMPORT_CASES)
def test_import_matches_peft(side, name, tmp_path):
    config = _import_configs(side)[name]
    torch.manual_seed(1)
    model = peft.get_peft_model(
        side.hf_model(), peft.LoraConfig(init_lora_weights=False, **config)
    ).eval()
    expected = side.hf_logits(model)
    assert_adapter_matters(expected, side.hf_base)
    model.save_pretrained(tmp_path)

    lm = import_peft(side.keras_lm(), tmp_path)
    assert_close(side.keras_logits(lm), expected)
    peft_count = sum(isinstance(x, peft.tuners.lora.LoraLayer) for x in model.modules())
    assert len(lora_layers(lm)) == peft_count


def test_import_refuses_what_it_cannot_map(side, tmp_path):
    # An adapter on the output head has no LoraLayer counterpart: refused
    # before anything changes.
    torch.manual_seed(1)
    model = peft.get_peft_model(
        side.hf_model(),
        peft.LoraConfig(target_modules=[side.module("query"), "lm_head"]),
    )
    model.save_pretrained(tmp_path)
    lm = side.keras_lm()
    before = snapshot(lm)
    with pytest.raises(ValueError, match="lm_head"):
        import_peft(lm, tmp_path)
    assert not lora_layers(lm)
    after = snapshot(lm)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


# --- Keras -> PEFT ----------------------------------------------------------


def _export_cases(family) -> dict:
    """`inject_lora` calls per case: (targets, rank, alpha, use_rslora)."""
    roles = family.roles
    block1 = family.block.format(block=1)
    return {
        "qv": [(family.default_targets, 4, 8.0, False)],
        "all_rslora": [(roles, 2, 6.0, True)],
        "mixed_ranks": [
            (("query", "value"), 2, 4.0, False),
            ((roles[-1],), 4, 3.0, False),
        ],
        "blocks": [
            (
                tuple(
                    f"{block1}/{family.projection(r).path}"
                    for r in ("key", "attention_output", roles[5])
                ),
                3,
                5.0,
                False,
            )
        ],
    }


@pytest.mark.parametrize(
    "name", IMPORT_CASES[:1] + ["all_rslora", "mixed_ranks", "blocks"]
)
def test_export_matches_peft(side, name, tmp_path):
    lm = side.keras_lm()
    for targets, rank, alpha, rslora in _export_cases(side.family)[name]:
        inject_lora(lm, rank=rank, alpha=alpha, targets=targets, use_rslora=rslora)
    randomize_lora_b(lm, scale=0.5)
    expected = side.keras_logits(lm)
    assert_adapter_matters(expected, side.hf_base)

    adapter = export_peft(lm, tmp_path)
    model = peft.PeftModel.from_pretrained(side.hf_model(), adapter).eval()
    assert_close(side.hf_logits(model), expected)
    peft_count = sum(isinstance(x, peft.tuners.lora.LoraLayer) for x in model.modules())
    assert peft_count == len(lora_layers(lm))


# --- merged models -> transformers --------------------------------------------


def test_merged_export_loads_in_transformers(side, tmp_path):
    lm = side.keras_lm()
    inject_lora(lm, rank=2, alpha=4.0, targets=side.family.roles)
    randomize_lora_b(lm, scale=0.5)
    merge_lora(lm)
    expected = side.keras_logits(lm)
    assert_adapter_matters(expected, side.hf_base)

    if not side.case.hf_export:
        with pytest.raises(ValueError, match="cannot write this"):
            export_hf_model(lm, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        return
    export_hf_model(lm, tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == side.case.hf_class
    assert_close(side.hf_logits(model.eval()), expected)


def test_merged_export_refuses_unmerged_models(side, tmp_path):
    lm = side.keras_lm()
    inject_lora(lm, rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        export_hf_model(lm, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
