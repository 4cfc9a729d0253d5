"""Figures people can read: attention maps carry token labels (also past 40 tokens), a colour bar and a
title naming the model, its patch and its DP setting; so does the saliency figure."""
import pytest

from tests.conftest import tiny_model
from utils import plot
from utils.tokenizer import ByteTokenizer


@pytest.fixture
def figures(monkeypatch, tmp_path):
    kept = []
    real = plot.save_png
    monkeypatch.setattr(plot, "save_png", lambda fig, path: (kept.append(fig), real(fig, path)))
    return kept


def test_model_title_names_model_patch_and_dp():
    assert plot.model_title("ft", "/r/ft/ckpt.pt", privacy={}) == "ft: ft/ckpt.pt (no DP)"
    t = plot.model_title("acme", "/r/base/ckpt.pt", "/r/sealed/acme.patch", {"epsilon": 7.99, "delta": 1e-5})
    assert t == "acme: base/ckpt.pt + patch acme.patch (DP-SGD ε=7.99, δ=1e-05)"


@pytest.mark.parametrize("prompt", ["Question: pay?", "Context: Ana Diaz Lopez. Question: What is the salary? Answer:"])
def test_attention_maps_have_token_labels_colour_bar_and_title(figures, tmp_path, prompt):
    plot.plot_attention_maps(tiny_model().eval(), ByteTokenizer(), prompt, tmp_path / "a.png", title="ft (no DP)")
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    colour_bars = [ax for ax in fig.axes if ax.get_ylabel() == "attention weight"]
    assert len(panels) == 4 and len(colour_bars) == 1
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    assert labels[0] == prompt[0] and 0 < len(labels) <= 40 and set(labels) <= set(prompt.replace(" ", "\u2423"))
    assert fig._suptitle.get_text().startswith("ft (no DP)\n")


def test_saliency_title_names_the_model(figures, tmp_path):
    plot.plot_saliency(tiny_model().eval(), ByteTokenizer(), "Question: pay?", tmp_path / "s.png", title="acme (DP)")
    assert figures[-1].axes[0].get_title().startswith("acme (DP)\n")


def test_title_for_reads_the_dp_setting_beside_the_checkpoint(tmp_path):
    (tmp_path / "dp").mkdir()
    (tmp_path / "dp" / "privacy.json").write_text('{"epsilon": 3.0, "delta": 1e-06}')
    assert plot.title_for(str(tmp_path / "dp" / "ckpt.pt")) == "dp: dp/ckpt.pt (DP-SGD ε=3, δ=1e-06)"
    assert plot.title_for(str(tmp_path / "ft" / "ckpt.pt")) == "ft: ft/ckpt.pt (no DP)"
    assert plot.title_for(str(tmp_path / "base" / "ckpt.pt"), str(tmp_path / "acme" / "t.patch")) == \
        "acme: base/ckpt.pt + patch t.patch"


def test_bar_figures_name_their_model(figures, tmp_path):
    from test_pipeline import eval as ev
    from test_pipeline import test_prompt_robustness as rb
    model = {"ckpt": str(tmp_path / "ft" / "ckpt.pt"), "patch": None}
    ev.plots({"model": model, "qa": {"per_field": {"Salary": {"exact_match": 0.5}}}}, str(tmp_path))
    assert figures[-1].axes[0].get_title().startswith("ft: ft/ckpt.pt (no DP)\n")
    rb.plot({"model": model, "paraphrase": {"per_field": {"Salary": {"consistency": 1, "correctness": 0.5}}},
             "typos": []}, str(tmp_path / "r.png"))
    assert figures[-1].axes[0].get_title().startswith("ft: ft/ckpt.pt (no DP)\n")
