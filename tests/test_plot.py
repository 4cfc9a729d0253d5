"""Figures people can read: attention maps carry token labels (also past 40 tokens), a colour bar and a
title naming the model, its patch and its DP setting; so does the saliency figure."""
import pytest
import torch

from tests.conftest import tiny_model
from tests.test_eval import PNG_MAGIC
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
    from utils import prompt_probes as rb
    from utils import quality_metrics as ev
    model = {"ckpt": str(tmp_path / "ft" / "ckpt.pt"), "patch": None}
    ev.plots({"model": model, "qa": {"per_field": {"Salary": {"exact_match": 0.5}}}}, str(tmp_path))
    assert figures[-1].axes[0].get_title().startswith("ft: ft/ckpt.pt (no DP)\n")
    rb.plot({"model": model, "paraphrase": {"per_field": {"Salary": {"consistency": 1, "correctness": 0.5}}},
             "typos": []}, str(tmp_path / "r.png"))
    assert figures[-1].axes[0].get_title().startswith("ft: ft/ckpt.pt (no DP)\n")


# ---------------------------------------------------------------- what the figures show
def test_attention_maps_are_causal_distributions_and_png(tmp_path):
    from utils.plot import plot_attention_maps
    m = tiny_model().eval()
    prompt = "Context: Ana Diaz. Question: What?"
    x = torch.tensor([ByteTokenizer().encode(prompt)])
    before, _ = m(x)
    maps = plot_attention_maps(m, ByteTokenizer(), prompt, tmp_path / "att.png")
    T = len(prompt)
    assert maps.shape == (2, 2, T, T)
    assert torch.allclose(torch.from_numpy(maps).sum(-1), torch.ones(2, 2, T), atol=1e-5)
    assert float(abs(torch.from_numpy(maps).triu(1)).max()) == 0.0  # no attention to future tokens
    after, _ = m(x)
    assert torch.equal(before, after)  # the weights are only kept for the plotted forward
    assert all(b.attn.need_weights is False and b.attn.last_attn is None for b in m.transformer.h)
    assert (tmp_path / "att.png").read_bytes()[:8] == PNG_MAGIC


def test_saliency_is_gradient_times_input(tmp_path):
    from utils.plot import plot_saliency, saliency
    m = tiny_model().double().eval()  # float64: the finite difference below needs the precision
    tok = ByteTokenizer()
    prompt = "Question: salary? Answer:"
    scores = plot_saliency(m, tok, prompt, tmp_path / "sal.png", target=" ")
    assert scores.shape == (len(prompt),)
    assert (tmp_path / "sal.png").read_bytes()[:8] == PNG_MAGIC
    assert all(p.grad is None for p in m.parameters())
    # directional derivative: scaling token t's embedding by (1 + h) moves the logit by h * score_t
    idx = torch.tensor([tok.encode(prompt)])
    target = tok.encode(" ")[0]
    s, _ = saliency(m, idx, target)
    emb = m.transformer.wte(idx).detach()
    pos = m.transformer.wpe(m.positions(idx))
    h = 1e-5
    for t in (0, len(prompt) // 2, len(prompt) - 1):
        logits = []
        for sign in (1, -1):
            e = emb.clone()
            e[0, t] *= 1 + sign * h
            x = e + pos
            for block in m.transformer.h:
                x = block(x)
            logits.append(m.lm_head(m.transformer.ln_f(x))[0, -1, target].item())
        assert (logits[0] - logits[1]) / (2 * h) == pytest.approx(float(s[t]), rel=1e-4, abs=1e-9)
