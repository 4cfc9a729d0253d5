"""
The one fine-tuning loop: a GPT on a records dataset with DP-SGD (Opacus), or without privacy (dp=False).
finetune_dp.py is its command line; finetune_encrypt_memmap.py, synthesize_dp.py, reproduce.py and the
test pipeline call finetune() here.

What is private, and how:
- The privacy unit is a person: the prepare scripts put every row of one person into one record,
  utils.data.RecordDataset yields one padded sequence per record, and each logical step is one global
  Poisson sample of records at rate q = batch_size / N (utils/dp_sampling.py: exactly q per record also
  under torchrun, every rank takes every step), never windows of a token stream. A record's loss is the mean over its target
  tokens (padding, and with loss_on='answer' everything but answers, is -1 and ignored); per-record
  gradients are clipped to max_grad_norm, summed, noised once per logical batch and divided by the
  *expected* batch size. microbatch_size only splits the work (Opacus's BatchMemoryManager).
- Budget: target_epsilon + target_delta calibrate the noise for the planned steps under the chosen
  adjacency ('add_remove', N treated as public; or 'replace_one', N public, which needs accountant='pld':
  utils/privacy_ledger.py), with accountant 'rdp' by default, 'prv' or 'pld' allowed ('gdp' is refused:
  it can underestimate epsilon); or an explicit noise_multiplier, with target_epsilon as a cap (None = no
  cap). Training stops before any step that would take epsilon past target_epsilon, and says so.
  target_delta defaults to min(1e-5, 1/(10 N)); delta >= 1/N is refused.
- Budgets compose: checkpoints carry the privacy history (segments with a salted fingerprint of the
  train data). A run from a DP checkpoint on the same data (or init_from='resume', which continues
  out_dir/ckpt.pt, written every checkpoint_interval steps with the optimizer state) reports and caps
  the epsilon of the whole history; on other data it reports its own and the base's apart.
- grad_sample_mode='bk' (default; book-keeping clipping, utils/bk_clipping.py: per-record norms and
  the clipped sum from one backward pass) and 'hooks' clip a weight shared by the embedding and the head
  exactly, so --untie_weights=False keeps the tie. 'ghost' (Opacus's ghost clipping, two backward
  passes) refuses it: untie_weights=True (default, private or not, so both train the same parameters)
  gives lm_head its own copy before anything is frozen (the head then trains even with
  freeze_embeddings), and ghost with a trainable tie falls back to hooks and says so. LoRA and
  train_last_blocks freeze both ends, so they leave the tie alone.
- ema_decay=d > 0 keeps an exponential moving average of the trained parameters (utils/iterate_averaging.py)
  and the final model (returned, evaluated, saved) is that average: post-processing of the released
  iterates, so the guarantee is unchanged; periodic checkpoints carry it, so a resumed run continues it.
- noise_quantization='int8' quantizes each gradient tensor that reaches the optimizer (after noise and,
  under torchrun, after the all-reduce) to int8 with a per-tensor scale and unbiased stochastic
  rounding: post-processing of the private gradient, so the guarantee is unchanged.
- Sampling, noise and rounding draw from a fresh 256-bit OS secret per run (utils/secure_rng.py:
  ChaCha20, Gaussian noise hardened against floating-point attacks; one install_noise hook on whichever
  Opacus optimizer the mode uses), never stored, logged or printed. reproducible_noise_seed=<int> is the
  explicit opt-in to replayable randomness for experiments: the guarantee then does NOT hold against
  anyone who knows the seed, and privacy.json, the log and every progress line say so. The training loss in the progress line and the log is NOT privatized: it is an operator's
  diagnostic on the private batch. Validation metrics are computed on the validation split.

--dp=False runs the same loop and the same sampling (sampling='poisson', or 'shuffle': fixed-size
shuffled batches, non-private only) with the gradient sum divided by the same expected batch size, no
clipping and no noise. AdamW's weight decay (default 0) never touches embeddings, so in a non-private
run tensors and embedding rows that never receive a gradient stay bit-identical to the base.

finetune(cfg, model=None, on_model_ready=None, log=print, on_trainer_ready=None) -> {"model", "privacy",
"history", "train_time_s"}; on_trainer_ready(trainer) runs once the DP optimizer exists, before the first
step (the audit's gradient canaries hook its noise draw there); with save=False nothing is written to disk. Otherwise out_dir gets ckpt.pt,
privacy.json (DP runs: epsilon, adjacency and what is public, the other relation's epsilon, the group
guarantee per canary repetition count in data_dir/canaries.json, the history, the randomness) and
log.jsonl (written as the run goes).
"""
import contextlib
import hashlib
import os
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager

from model import GPT
from utils.atomic import json_safe, write_json
from utils.bk_clipping import BookKeeping
from utils import privacy_ledger as ledger
from utils.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, unwrap
from utils.cli import UserError
from utils.data import LOSS_ON, RecordDataset, load_meta
from utils.distributed import leave_process_group
from utils.iterate_averaging import ParameterEMA
from utils.lr_schedule import FINETUNE_SCHEDULES, finetune_lr
from utils import run_privacy
from utils.dp_sampling import poisson_loader
from utils.run_log import RunLog
from utils.secure_rng import RunSecret, install_noise

DEFAULTS = dict(
    # where from, where to
    base_ckpt="out/base/ckpt.pt",  # a train.py checkpoint...
    init_from="",  # ...or GPT-2 weights (a save_pretrained dir or hub name), or 'resume': continue out_dir/ckpt.pt
    data_dir="data/employees",  # a records dataset (data/<name>/prepare.py)
    out_dir="out/finetune_dp",  # ckpt.pt, privacy.json and log.jsonl go here
    save=True,  # False: nothing at all is written to disk
    # data
    block_size=0,  # 0 = the base model's; a record longer than it is refused before training...
    truncate_records=False,  # ...unless True: then cut to block_size + 1 tokens, counted in the log and privacy.json
    loss_on="all",  # 'all' | 'answer' | 'last_answer' (each record's last answer only; both need {split}_answer_mask.bin)
    sampling="poisson",  # 'poisson' (always with dp) | 'shuffle' (dp=False only)
    # privacy
    dp=True,             # DP-SGD (Opacus); False = the same loop without privacy
    target_epsilon=8.0,  # None: no target (only with an explicit noise_multiplier)
    target_delta=None,  # None: min(1e-5, 1/(10 N)); must be < 1/N
    noise_multiplier=None,  # None: calibrated from target_epsilon for the planned steps
    max_grad_norm=1.0,   # per-record clipping norm C
    accountant="rdp",  # 'rdp' | 'prv' (Opacus, add_remove only) | 'pld' (dp-accounting, either adjacency)
    adjacency="add_remove",  # neighbours differ by adding/removing one person | 'replace_one' (N public; needs pld)
    grad_sample_mode="bk",  # 'bk' (book-keeping, one backward) | 'ghost' | 'hooks'
    secure_mode=True,  # noise, sampling and rounding from a fresh OS secret (ChaCha20); False is refused
    reproducible_noise_seed=None,  # int: replayable DP randomness for experiments; NO guarantee vs whoever knows it
    noise_quantization="none",  # 'none' | 'int8'
    # batches and length
    batch_size=32,  # expected logical batch (records)
    microbatch_size=8,  # physical batch
    max_steps=0,  # logical steps; 0 = from epochs
    epochs=3.0,         # passes over the records (with max_steps=0)
    # optimizer
    optimizer="adamw",  # 'adamw' | 'sgd'
    learning_rate=1e-3,  # peak learning rate
    lr_schedule="constant",  # 'constant' | 'cosine': warmup_steps linear, then down to min_lr_ratio x peak at the last step | 'wsd': warmup, peak, linear decay over the last decay_fraction
    warmup_steps=0,  # 'cosine' / 'wsd': linear warmup steps
    min_lr_ratio=0.1,  # 'cosine' / 'wsd': the last step's learning rate / the peak
    decay_fraction=0.2,  # 'wsd': the share of the planned steps over which the rate falls to min_lr_ratio x peak
    weight_decay=0.0,  # never on embeddings, biases or LayerNorm
    beta1=0.9,          # AdamW first-moment decay
    beta2=0.999,        # AdamW second-moment decay
    momentum=0.0,  # sgd only
    ema_decay=0.0,  # d in (0, 1): the model returned and saved is the EMA of the iterates (post-processing: same epsilon)
    # what is trained
    untie_weights=True,  # give lm_head its own copy of the embedding (ghost clipping refuses a tie)
    freeze_embeddings=False,  # keep token and position embeddings fixed
    freeze_first_blocks=0,  # keep the first K blocks fixed
    train_last_blocks=0,  # K > 0: only the last K blocks and the final LayerNorm train
    lora_rank=0,  # r > 0: LoRA adapters on lora_targets, every base weight frozen
    lora_alpha=16.0,  # LoRA scale: updates are (alpha / rank) B A
    lora_targets=("attn",),  # attn, mlp
    # system
    seed=1337,  # model init (LoRA) and non-private sampling only; DP randomness is a secret (reproducible_noise_seed)
    device="cpu",     # 'cpu' or 'cuda'
    dtype="float32",  # 'float32' | 'float64' | 'bfloat16' (autocast on CUDA)
    eval_interval=50,  # steps between evaluations
    eval_records=0,  # 0 = the whole validation split
    log_interval=10,  # steps between progress lines
    checkpoint_interval=50,  # steps between atomic ckpt.pt writes in out_dir (a crash loses at most this); 0 = end only
)

SUPPORTED_ACCOUNTANTS = ledger.ACCOUNTANTS


# ----------------------------------------------------------------------------- checks and setup
def check_config(cfg):
    """Refuse bad settings before anything is loaded or written."""
    if cfg["save"] and os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        raise UserError(f"--out_dir={cfg['out_dir']} is a file, not a directory")
    choices = dict(loss_on=LOSS_ON, sampling=("poisson", "shuffle"), grad_sample_mode=("ghost", "hooks", "bk"),
                   noise_quantization=("none", "int8"), optimizer=("adamw", "sgd"),
                   dtype=("float32", "float64", "bfloat16"))
    if cfg["dtype"] == "float16":
        raise UserError("dtype='float16' needs loss scaling, which would also scale per-record gradient norms "
                        "and break DP clipping; use 'bfloat16' (CUDA) or 'float32'")
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    if cfg["accountant"] == "gdp":
        raise UserError("accountant='gdp' is refused: its Gaussian approximation can underestimate epsilon; "
                        "use 'rdp' (default) or 'prv'")
    try:
        ledger.check_accountant(cfg["adjacency"], cfg["accountant"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg["secure_mode"] is not True:
        raise UserError("secure_mode=False is gone: DP randomness always comes from a secret; for replayable "
                        "experiments set reproducible_noise_seed=<int> (no guarantee against whoever knows it)")
    seed = cfg["reproducible_noise_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"reproducible_noise_seed must be an integer or None; got {seed!r}")
    if cfg["checkpoint_interval"] < 0:
        raise UserError("checkpoint_interval must be >= 0")
    if cfg["init_from"] == "resume" and not cfg["save"]:
        raise UserError("init_from='resume' continues out_dir/ckpt.pt and writes there: it needs save=True")
    if cfg["batch_size"] <= 0 or cfg["microbatch_size"] <= 0:
        raise UserError("batch_size and microbatch_size must be positive")
    if cfg["microbatch_size"] > cfg["batch_size"]:
        raise UserError(f"microbatch_size ({cfg['microbatch_size']}) > batch_size ({cfg['batch_size']}): the "
                        "physical batch splits the logical one, so it cannot be larger")
    if cfg["max_steps"] < 0 or (cfg["max_steps"] == 0 and not cfg["epochs"] > 0):
        raise UserError("give max_steps > 0 or epochs > 0")
    decay = cfg["ema_decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1) (0 = the last iterate); got {cfg['ema_decay']}")
    if cfg["learning_rate"] <= 0 or cfg["weight_decay"] < 0:
        raise UserError("learning_rate must be positive and weight_decay non-negative")
    if (cfg["lr_schedule"] not in FINETUNE_SCHEDULES or cfg["warmup_steps"] < 0
            or not 0 <= cfg["min_lr_ratio"] <= 1 or not 0 < cfg["decay_fraction"] <= 1):
        raise UserError(f"lr_schedule must be 'constant', 'cosine' or 'wsd' (got {cfg['lr_schedule']!r}), warmup_steps >= 0, "
                        f"min_lr_ratio in [0, 1] and decay_fraction in (0, 1]")
    if not cfg["dp"]:
        return
    if cfg["sampling"] != "poisson":
        raise UserError("dp=True needs sampling='poisson': the privacy accountant assumes Poisson sampling")
    if not cfg["max_grad_norm"] > 0:
        raise UserError(f"max_grad_norm must be > 0 (it bounds each record's gradient); got {cfg['max_grad_norm']}")
    nm, eps = cfg["noise_multiplier"], cfg["target_epsilon"]
    if nm is None and (eps is None or not eps > 0):
        raise UserError("give target_epsilon > 0, or an explicit noise_multiplier")
    if nm is not None and not (isinstance(nm, (int, float)) and nm >= 0):
        raise UserError(f"noise_multiplier must be a number >= 0; got {nm!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0):
        raise UserError(f"target_epsilon must be a number > 0 (or None); got {eps!r}")


def derived_seed(seed, purpose, rank=0):
    """Independent, reproducible seeds per purpose and rank (sampling, noise, rounding)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{rank}".encode()).digest()[:8], "little") >> 1


def generator(seed, purpose, rank=0, device="cpu"):
    """A seeded torch generator: for non-private runs only (DP randomness comes from utils.secure_rng)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, purpose, rank))


def distributed_setup(cfg):
    """(rank, world_size, device, created): under torchrun, join the process group (gloo on CPU)."""
    device = cfg["device"]
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, created


def precision(cfg, device):
    """(parameter dtype, autocast context). bf16 is autocast over fp32 weights, on CUDA only."""
    if cfg["dtype"] == "float64":
        return torch.float64, contextlib.nullcontext(), None
    if cfg["dtype"] == "bfloat16":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.float32, torch.autocast(device_type="cuda", dtype=torch.bfloat16), None
        return torch.float32, contextlib.nullcontext(), "dtype=bfloat16 needs a CUDA GPU with bf16: training in float32"
    return torch.float32, contextlib.nullcontext(), None


def load_base(cfg):
    """(GPT, the checkpoint dict or None). init_from='resume' reads out_dir/ckpt.pt."""
    if cfg["init_from"] and cfg["base_ckpt"] and cfg["base_ckpt"] != DEFAULTS["base_ckpt"]:
        raise UserError("give base_ckpt or init_from, not both")
    if cfg["init_from"] == "resume":
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        ckpt = load_checkpoint(path)
        if "run_state" not in ckpt or "privacy_history" not in ckpt:
            raise UserError(f"{path} is not a fine-tuning checkpoint (no run state / privacy history)")
        return model_from_checkpoint(ckpt, path), ckpt
    if cfg["init_from"]:
        try:
            return GPT.from_pretrained(cfg["init_from"]), None
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load GPT-2 weights from {cfg['init_from']!r}: {str(e).splitlines()[0]}") from None
    ckpt = load_checkpoint(cfg["base_ckpt"])
    return model_from_checkpoint(ckpt, cfg["base_ckpt"]), ckpt


def check_vocab(gpt, meta, cfg):
    """The model must have been trained on the data's tokenizer: same vocabulary, or it padded to 64."""
    v_data, v_model = int(meta["vocab_size"]), gpt.config.vocab_size
    if v_model not in (v_data, -(-v_data // 64) * 64):
        source = cfg["init_from"] or cfg["base_ckpt"] or "the model"
        raise UserError(f"{source} has a vocabulary of {v_model} tokens but {cfg['data_dir']} uses "
                        f"{meta['tokenizer']} with {v_data}: fine-tune a base trained on the same tokenizer")


def prepare_model(gpt, cfg):
    """Untie / freeze / add LoRA, in place. Returns a list of lines for the log."""
    notes = []
    n_layer = gpt.config.n_layer
    if cfg["lora_rank"] > 0:
        frozen = {k: off for k, off in (("freeze_embeddings", False), ("freeze_first_blocks", 0),
                                         ("train_last_blocks", 0)) if cfg[k]}
        if frozen:
            raise UserError("lora_rank > 0 already freezes every base weight: add "
                            + " ".join(f"--{k}={off}" for k, off in frozen.items()))
        if gpt.lora_config:
            raise UserError("the base model already has LoRA adapters; merge them first or fine-tune without lora_rank")
        try:
            gpt.add_lora(cfg["lora_rank"], cfg["lora_alpha"], tuple(cfg["lora_targets"]))
        except ValueError as e:
            raise UserError(str(e)) from None
        notes.append(f"LoRA r={cfg['lora_rank']} alpha={cfg['lora_alpha']} on {','.join(cfg['lora_targets'])}")
        return notes
    k = cfg["train_last_blocks"]
    if k:
        if not 0 < k <= n_layer or cfg["freeze_first_blocks"]:
            raise UserError(f"train_last_blocks must be in 1..{n_layer} and not combined with freeze_first_blocks")
        gpt.freeze(embeddings=True, first_blocks=n_layer - k, head=True)
        notes.append(f"training the last {k} of {n_layer} blocks and the final LayerNorm only")
        return notes
    if not 0 <= cfg["freeze_first_blocks"] <= n_layer:
        raise UserError(f"freeze_first_blocks must be in 0..{n_layer}")
    if cfg["untie_weights"] and gpt.weights_tied:
        gpt.untie_weights()
        notes.append("untied lm_head from the token embedding (a copy)")
    gpt.freeze(embeddings=cfg["freeze_embeddings"], first_blocks=cfg["freeze_first_blocks"])
    if cfg["freeze_embeddings"] or cfg["freeze_first_blocks"]:
        notes.append(f"frozen: {'embeddings, ' if cfg['freeze_embeddings'] else ''}"
                     f"first {cfg['freeze_first_blocks']} blocks")
    return notes


def trainable_parameters(gpt):
    return [p for p in gpt.parameters() if p.requires_grad]


def param_groups(gpt, weight_decay):
    """Decay only >=2-D matmul weights; never embeddings (their untouched rows must not move), biases, LN."""
    embeddings = {id(m.weight) for m in gpt.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in trainable_parameters(gpt):
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(gpt, cfg):
    groups = param_groups(gpt, cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["learning_rate"], momentum=cfg["momentum"])
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))


# ----------------------------------------------------------------------------- the privacy budget
def epsilon_after(steps, noise_multiplier, sample_rate, delta, accountant, prior=(), adjacency="add_remove"):
    """Epsilon of `prior` segments then `steps` Poisson-sampled Gaussian steps (utils.privacy_ledger)."""
    try:
        return ledger.epsilon(list(prior) + [(noise_multiplier, sample_rate, steps)], delta, adjacency, accountant)
    except ValueError:
        raise
    except Exception as e:  # prv's known failures ("cannot compute epsilon", memory)
        raise UserError(f"the {accountant} accountant failed ({type(e).__name__}: {str(e)[:80]}); "
                        "use accountant=rdp") from None


def plan_budget(cfg, n_records, prior=()):
    """Sample rate, steps, delta and noise for the run; the steps the budget allows. `prior`: the segments
    this model already spent on the same data (resume, or a DP base): the target covers them too."""
    q = cfg["batch_size"] / n_records
    if q > 1:
        raise UserError(f"batch_size ({cfg['batch_size']}) is larger than the dataset ({n_records} records)")
    steps = cfg["max_steps"] or max(1, round(cfg["epochs"] / q))
    prior = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in prior]
    plan = dict(sample_rate=q, planned_steps=steps, steps=steps, dataset_size=n_records, prior=prior)
    if not cfg["dp"]:
        return plan
    delta = cfg["target_delta"] if cfg["target_delta"] is not None else min(1e-5, 1 / (10 * n_records))
    if not 0 < delta < 1 / n_records:
        raise UserError(f"target_delta={delta:g} must be in (0, 1/N = {1 / n_records:.3g}): a mechanism that "
                        f"publishes one random record in full already satisfies delta = 1/N; the default "
                        f"min(1e-5, 1/(10 N)) = {min(1e-5, 1 / (10 * n_records)):.3g} is safe")
    target, accountant, adjacency = cfg["target_epsilon"], cfg["accountant"], cfg["adjacency"]
    spent = epsilon_after(0, 1.0, q, delta, accountant, prior, adjacency)
    if target is not None and spent >= target:
        raise UserError(f"the model already spent epsilon {spent:.3f} of target_epsilon={target} on this data "
                        f"({sum(s for _, _, s in prior)} earlier steps): raise target_epsilon or stop here")
    if cfg["noise_multiplier"] is None:
        if not prior and accountant != "pld" and adjacency == "add_remove":
            try:
                sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                             accountant=accountant)
            except ValueError:
                sigma = None
        else:
            sigma = ledger.calibrate_noise(target, prior, q, steps, delta, adjacency, accountant)
        if sigma is None:
            raise UserError(f"target_epsilon={target} is unreachable for {steps} steps at sample rate {q:.3g} "
                            f"(delta={delta:.3g}) with the {accountant} accountant: raise target_epsilon, or "
                            "lower max_steps/epochs or batch_size")
    else:
        sigma = float(cfg["noise_multiplier"])
    budget_steps = steps
    if target is not None:
        budget_steps = ledger.steps_within(target, prior, sigma, q, steps, delta, adjacency, accountant)
        if budget_steps == 0:
            raise UserError(f"target_epsilon={target} is unreachable: one step at noise_multiplier={sigma:g} and "
                            f"sample rate {q:.3g} already spends more; raise noise_multiplier or target_epsilon, "
                            "or lower batch_size")
    plan.update(delta=delta, noise_multiplier=sigma, steps=budget_steps, accountant=accountant, target_epsilon=target,
                adjacency=adjacency)
    return plan


# ----------------------------------------------------------------------------- the optimizer protocol
class PlainOptimizer:
    """The non-private twin of Opacus's DPOptimizer for --dp=False: the same microbatch protocol
    (BatchMemoryManager's signal_skip_step), so one loop drives both. Gradients sum over the microbatches
    of a logical batch (the loss is already divided by the expected batch size) and, under torchrun, over
    ranks before the update."""

    def __init__(self, optimizer, world_size=1):
        self.original_optimizer = optimizer
        self.world_size = world_size
        self._skip_queue = []
        self._last_skipped = False

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    def signal_skip_step(self, do_skip=True):
        self._skip_queue.append(do_skip)

    def step(self):
        self._last_skipped = self._skip_queue.pop(0) if self._skip_queue else False
        if self._last_skipped:
            return
        if self.world_size > 1:
            for group in self.param_groups:
                for p in group["params"]:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        self.original_optimizer.step()

    def zero_grad(self, set_to_none=True):
        if not self._last_skipped:
            self.original_optimizer.zero_grad(set_to_none=set_to_none)


def quantize_int8_(grad, stream):
    """In place: grad <- scale * q with q int8 in [-127, 127], scale = max|grad| / 127, and stochastic
    rounding q = floor(grad / scale + U), U ~ Uniform(0, 1) from the rounding keystream, so
    E[scale * q] = grad (unbiased)."""
    scale = grad.abs().max() / 127
    if scale == 0 or not torch.isfinite(scale):
        return
    u = stream.uniform(grad.numel(), device=grad.device).view(grad.shape).to(grad.dtype)
    q = torch.floor(grad / scale + u).clamp_(-127, 127).to(torch.int8)
    grad.copy_(q.to(grad.dtype) * scale)


class Trainer:
    """The model, optimizer and data for one run: private (Opacus) or not, built the same way.
    train_microbatch() is the loop body; tests drive it directly on fixed batches."""

    def __init__(self, cfg, gpt, train_set, plan, rank=0, world_size=1, device="cpu", autocast=None, log=print):
        self.cfg, self.gpt, self.dp, self.device = cfg, gpt, cfg["dp"], device
        self.autocast = autocast or contextlib.nullcontext()
        self.world_size = world_size
        self.expected_batch_size = cfg["batch_size"]
        self.trainable = trainable_parameters(gpt)
        if not self.trainable:
            raise UserError("nothing to train: every parameter is frozen")
        self.mode = cfg["grad_sample_mode"]
        if self.dp and self.mode == "ghost" and gpt.weights_tied and gpt.lm_head.weight.requires_grad:
            log("ghost clipping refuses the tied embedding/head weight: falling back to grad_sample_mode=hooks "
                "(set untie_weights=True to keep ghost clipping)")
            self.mode = "hooks"
        gpt.train()  # Opacus only wraps a model in training mode (load_model returns one in eval)
        module = gpt
        if world_size > 1:
            module = DPDDP(gpt)  # broadcasts rank 0's weights; gradients are reduced by the optimizer
        optimizer = make_optimizer(gpt, cfg)
        self.plan = plan
        # The DP randomness: a fresh secret shared by the ranks (utils/secure_rng.py), or, only when asked, one
        # derived from reproducible_noise_seed. Non-private runs are simply reproducible from `seed`.
        self.reproducible = not self.dp or cfg["reproducible_noise_seed"] is not None
        secret = RunSecret.shared(cfg["reproducible_noise_seed"] if self.dp else cfg["seed"], rank, world_size,
                                  device if device.startswith("cuda") else "cpu")
        sampling_stream = secret.stream("sampling")  # the same on every rank: one global draw per step
        self.engine, self.criterion = None, None
        if self.dp:
            with warnings.catch_warnings():
                # Opacus's own secure_mode needs torchcsprng; our noise hook below replaces its generator
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                self.engine = PrivacyEngine(accountant="rdp" if plan["accountant"] == "pld" else plan["accountant"],
                                            secure_mode=False)
            if self.mode == "bk":
                # Book-keeping clipping (utils/bk_clipping.py) puts each physical batch's clipped sum in
                # p.grad; Opacus's ghost-clipping optimizer then accumulates, noises, scales and accounts.
                self.model = BookKeeping(module, cfg["max_grad_norm"])
                optimizer_class = get_optimizer_class(clipping="flat", distributed=world_size > 1, grad_sample_mode="ghost")
                self.optimizer = optimizer_class(optimizer, noise_multiplier=plan["noise_multiplier"],
                                                 max_grad_norm=cfg["max_grad_norm"], expected_batch_size=cfg["batch_size"])
            else:
                placeholder = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"])
                out = self.engine.make_private(
                    module=module, optimizer=optimizer, data_loader=placeholder,
                    criterion=torch.nn.CrossEntropyLoss(ignore_index=-1),
                    noise_multiplier=plan["noise_multiplier"], max_grad_norm=cfg["max_grad_norm"],
                    grad_sample_mode=self.mode, poisson_sampling=True)  # noise: install_noise below
                if self.mode == "ghost":
                    self.model, self.optimizer, self.criterion, _ = out
                else:
                    self.model, self.optimizer, _ = out
            # make_private infers q = 1/len(loader) and an integer expected batch; use exactly
            # q = batch_size / N and batch_size instead: the loader, the divisor and the accountant agree.
            self.optimizer.expected_batch_size = cfg["batch_size"] / world_size  # per rank; ranks' sums add up
            self.optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=plan["sample_rate"]))
            install_noise(self.optimizer, secret.stream("noise", rank))  # whatever the optimizer class
            self.loader = poisson_loader(train_set, plan["sample_rate"], sampling_stream, rank, world_size)
        else:
            self.model, self.optimizer = module, PlainOptimizer(optimizer, world_size)
            if cfg["sampling"] == "poisson":
                self.loader = poisson_loader(train_set, plan["sample_rate"], sampling_stream, rank, world_size)
            else:
                if world_size > 1:
                    raise UserError("sampling='shuffle' runs in one process only; use sampling='poisson' under torchrun")
                self.loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True,
                                                          generator=generator(cfg["seed"], "sampling"))
        # The wrapped optimizer calls the base optimizer's step once per logical batch, after noise and
        # the all-reduce: count steps there, and quantize there (post-processing of the private gradient).
        base = self.optimizer.original_optimizer
        self.steps, self._epsilon = 0, (None, None)
        base.register_step_post_hook(lambda *_: setattr(self, "steps", self.steps + 1))
        if cfg["noise_quantization"] == "int8":
            rounding_gen = secret.stream("rounding")  # shared: every rank rounds its copy identically

            def quantize_grads(opt, *_):
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            quantize_int8_(p.grad, rounding_gen)
            base.register_step_pre_hook(quantize_grads)

    def train_microbatch(self, x, y):
        """Forward and backward one physical batch, then optimizer.step() (which only accumulates until
        the logical batch ends). Returns the sum of the records' losses and the record count."""
        n = x.size(0)
        if n:  # drop the columns past every record's last target: the padding (causal, so nothing else changes)
            targets = (y != -1).any(0).nonzero()  # ascending
            keep = int(targets[-1]) + 1 if len(targets) else 1
            x, y = x[:, :keep].contiguous(), y[:, :keep].contiguous()  # Opacus ghost needs contiguous ids
        x, y = x.to(self.device), y.to(self.device)
        if n == 0:  # an empty Poisson batch still takes its (noise-only) step
            for p in self.trainable:
                p.grad = torch.zeros_like(p)
                if self.dp and self.mode == "hooks":
                    p.grad_sample = p.new_zeros((0, *p.shape))
            loss_sum = 0.0
        else:
            with self.autocast:
                logits, _ = self.model(x)
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()
            if self.criterion is not None:  # ghost: Opacus's loss runs the two backward passes
                loss = self.criterion(logits.flatten(0, 1), y.flatten(), shape=logits.shape)
                losses = loss.loss_per_sample.detach()
            else:
                losses = record_losses(logits, y)
                # hooks: Opacus undoes the mean to get per-record gradients; bk: the sum (each record's own
                # gradient reaches every layer); plain: sum / expected batch
                if self.dp:
                    loss = losses.sum() if self.mode == "bk" else losses.mean()
                else:
                    loss = losses.sum() / self.expected_batch_size
                losses = losses.detach()
            with warnings.catch_warnings():
                # Opacus's backward hook on the token embedding, whose input (ids) needs no grad: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if self.dp and self.mode == "bk":
                self.model.clip_and_sum()  # the clipped per-record sum -> p.grad, for the optimizer
            loss_sum = float(losses.sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, n

    def epsilon(self, delta):
        """Epsilon spent so far, with the earlier segments on this data (memoized per step)."""
        if not self.dp:
            return None
        if self._epsilon[0] != self.steps:
            plan = self.plan
            eps = epsilon_after(self.steps, self.optimizer.noise_multiplier, plan["sample_rate"], delta,
                                plan["accountant"], plan["prior"], plan["adjacency"])
            self._epsilon = (self.steps, eps)
        return self._epsilon[1]

    def close(self):
        """Remove Opacus's hooks and per-parameter attributes; return the plain GPT in eval mode."""
        if hasattr(self.model, "_close"):
            self.model._close()
        if isinstance(self.model, BookKeeping):
            self.model.close()
        for p in self.gpt.parameters():
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        return self.gpt.eval()


def record_losses(logits, y):
    """(B,) per-record loss: mean over the record's target tokens (targets of -1 are ignored). The same
    reduction as Opacus's ghost-clipping criterion given shape=logits.shape."""
    tok = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)
    return tok.sum(1) / (y != -1).sum(1).clamp(min=1)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(gpt, val_set, answer_set, batch_size, device, autocast, limit=0):
    """Validation loss (per-record mean, as in training) and, where answers are marked, teacher-forced
    answer accuracy: per token, and exact (every answer token argmax-correct = greedy decoding
    reproduces the whole answer)."""
    was_training = gpt.training
    gpt.eval()
    n = min(limit, len(val_set)) if limit else len(val_set)
    loss_sum, exact, with_answer, tok_ok, tok_n = 0.0, 0, 0, 0, 0
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        x = torch.stack([val_set[i][0] for i in idx]).to(device)
        y = torch.stack([val_set[i][1] for i in idx]).to(device)
        with autocast:
            logits, _ = gpt(x)
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
        loss_sum += float(record_losses(logits, y).sum())
        if answer_set is not None:
            ya = torch.stack([answer_set[i][1] for i in idx]).to(device)
            mask = ya != -1
            hit = (logits.argmax(-1) == ya) & mask
            tok_ok += int(hit.sum())
            tok_n += int(mask.sum())
            exact += int(((hit | ~mask).all(1) & mask.any(1)).sum())
            with_answer += int(mask.any(1).sum())
    gpt.train(was_training)
    out = {"val_loss": loss_sum / n}
    if answer_set is not None and tok_n:
        out.update(answer_exact=exact / with_answer, answer_token_acc=tok_ok / tok_n)
    return out


# ----------------------------------------------------------------------------- the run
def finetune(cfg, model=None, on_model_ready=None, log=print, on_trainer_ready=None):
    cfg = {**DEFAULTS, **cfg}
    check_config(cfg)
    rank, world_size, device, created_group = distributed_setup(cfg)
    say = log if rank == 0 else (lambda *a, **k: None)
    finished = False
    try:
        result = _finetune(cfg, model, on_model_ready, say, rank, world_size, device, on_trainer_ready)
        finished = True
        return result
    finally:
        if created_group:
            leave_process_group(finished)


def build_run(cfg, model=None, on_model_ready=None, log=print, rank=0, world_size=1, device=None,
              on_trainer_ready=None):
    """Load and check the data and base model, prepare the model, plan the budget, build the Trainer.
    Returns a namespace: trainer, gpt, plan, val_set, answer_set, autocast, n_trainable."""
    cfg = {**DEFAULTS, **cfg}
    check_config(cfg)
    device = device or cfg["device"]
    torch.manual_seed(cfg["seed"])
    meta = load_meta(cfg["data_dir"])
    gpt, base = (unwrap(model), None) if model is not None else load_base(cfg)
    check_vocab(gpt, meta, cfg)
    block_size = cfg["block_size"] or gpt.config.block_size
    if block_size > gpt.config.block_size:
        raise UserError(f"block_size {block_size} exceeds the model's {gpt.config.block_size}")
    train_set = RecordDataset(cfg["data_dir"], "train", block_size, cfg["loss_on"], meta)
    val_set = answer_set = None
    if os.path.isfile(os.path.join(cfg["data_dir"], "val_offsets.bin")):
        val_set = RecordDataset(cfg["data_dir"], "val", block_size, cfg["loss_on"], meta)
        if os.path.isfile(os.path.join(cfg["data_dir"], "val_answer_mask.bin")):
            answer_set = RecordDataset(cfg["data_dir"], "val", block_size, "answer", meta)
    n_truncated = train_set.check_fit(cfg["truncate_records"])
    if val_set is not None:
        val_set.check_fit(cfg["truncate_records"])
    n = len(train_set)
    log(f"data: {n} train records{f', {len(val_set)} val' if val_set else ''}, block_size {block_size}, "
        f"loss on {cfg['loss_on']}; {n_truncated} train records longer than block_size truncated")
    lineage = run_privacy.lineage(cfg, base)
    run_cfg = cfg
    if lineage["resume"]:
        sigma, remaining = lineage["resume"]
        run_cfg = {**cfg, "noise_multiplier": sigma, "max_steps": remaining}
        log(f"resuming {cfg['out_dir']}/ckpt.pt at step {base['iter_num']}: {remaining} steps left at noise "
            f"multiplier {sigma:.4g}; accounting continues from the {sum(s['steps'] for s in lineage['prior'])} "
            "steps taken (fresh secret randomness)")
    plan = plan_budget(run_cfg, n, lineage["prior"])
    plan.update(truncated_records=n_truncated, lineage=lineage)

    notes = [] if lineage["resume"] and gpt.lora_config else prepare_model(gpt, cfg)  # a resumed LoRA is ready
    param_dtype, autocast, precision_note = precision(cfg, device)
    gpt.to(device=device, dtype=param_dtype)
    for line in notes + ([precision_note] if precision_note else []):
        log(line)
    if on_model_ready is not None:
        on_model_ready(gpt)
    tr = Trainer(cfg, gpt, train_set, plan, rank, world_size, device, autocast, log)
    if on_trainer_ready is not None:
        on_trainer_ready(tr)
    if lineage["resume"]:
        tr.optimizer.original_optimizer.load_state_dict(base["optimizer"])
    ema = ParameterEMA(trainable_parameters(gpt), cfg["ema_decay"]) if cfg["ema_decay"] else None
    if ema is not None:
        continued = bool(lineage["resume"]) and "ema" in base
        if continued:
            ema.load_state_dict(base["ema"])
        log(f"iterate averaging: the final model is the EMA (decay {cfg['ema_decay']:g}) of the iterates"
            + (", continued from the checkpoint" if continued
               else ", started at " + ("the resumed weights" if lineage["resume"] else "the initial weights")))
    n_trainable = gpt.get_num_params(non_embedding=False, trainable_only=True)
    delta = plan.get("delta")
    if cfg["dp"]:
        log(f"DP-SGD ({tr.mode}): noise_multiplier {plan['noise_multiplier']:.4g}, clip {cfg['max_grad_norm']}, "
            f"sample rate {plan['sample_rate']:.4g}, {plan['planned_steps']} steps planned, delta {delta:.3g}, "
            f"accountant {plan['accountant']}, adjacency {plan['adjacency']}; {n_trainable:,} trainable parameters")
        log(run_privacy.randomness_note(cfg))
        if lineage["prior"] and not lineage["resume"]:
            log(f"the base already went through {sum(s['steps'] for s in lineage['prior'])} DP steps on this data: "
                "the target covers the whole history")
        if lineage["elsewhere"]:
            log("the base was trained privately on other data: its epsilon is reported apart (privacy.json)")
        if plan["noise_multiplier"] == 0:
            log("noise_multiplier=0: no privacy guarantee (epsilon = inf)")
        if plan["steps"] < plan["planned_steps"]:
            over = epsilon_after(plan["steps"] + 1, plan["noise_multiplier"], plan["sample_rate"], delta, plan["accountant"],
                                 plan["prior"], plan["adjacency"])
            log(f"budget: training stops after {plan['steps']} of {plan['planned_steps']} steps; step "
                f"{plan['steps'] + 1} would spend epsilon {over:.3f} > target {plan['target_epsilon']}")
    else:
        log(f"non-private ({cfg['sampling']} sampling, expected batch {cfg['batch_size']}): "
            f"{plan['steps']} steps; {n_trainable:,} trainable parameters")
    return SimpleNamespace(trainer=tr, gpt=gpt, plan=plan, val_set=val_set, answer_set=answer_set,
                           autocast=autocast, n_trainable=n_trainable, ema=ema)


def _finetune(cfg, model, on_model_ready, log, rank, world_size, device, on_trainer_ready=None):
    run = build_run(cfg, model, on_model_ready, log, rank, world_size, device, on_trainer_ready)
    tr, gpt, plan, val_set, answer_set, autocast = (run.trainer, run.gpt, run.plan, run.val_set, run.answer_set,
                                                    run.autocast)
    n, n_trainable, delta = plan["dataset_size"], run.n_trainable, plan.get("delta")
    lineage = plan["lineage"]
    writes = cfg["save"] and rank == 0
    out = cfg["out_dir"]
    run_log = RunLog(os.path.join(out, "log.jsonl"), append=bool(lineage["resume"])) if writes else None
    if run_log:
        run_log.write({"event": "resume" if lineage["resume"] else "config", **json_safe(cfg),
                       "randomness": run_privacy.randomness_note(cfg) if cfg["dp"] else "non-private"})
    state = lineage.get("state") or {"total_planned_steps": plan["planned_steps"], "steps_done": 0}

    def set_lr(*_):  # the next step's rate, counted over the whole run (a resumed one continues the schedule)
        lr = finetune_lr(state["steps_done"] + tr.steps, state["total_planned_steps"], cfg)
        for group in tr.optimizer.original_optimizer.param_groups:
            group["lr"] = lr
    set_lr()  # after a resumed optimizer's state (which carries its old rate) is loaded
    tr.optimizer.original_optimizer.register_step_post_hook(set_lr)
    ema = run.ema
    if ema is not None:
        tr.optimizer.original_optimizer.register_step_post_hook(ema.update)
    warn = f" [{run_privacy.REPRODUCIBLE_WARNING}]" if cfg["dp"] and cfg["reproducible_noise_seed"] is not None else ""

    def segments():
        """The model's whole DP history, this run's steps so far included."""
        if not cfg["dp"]:
            return lineage["prior"] + lineage["elsewhere"]
        this = ledger.segment(plan["noise_multiplier"], plan["sample_rate"], tr.steps, cfg["max_grad_norm"],
                              plan["adjacency"], lineage["fingerprint"])
        return lineage["elsewhere"] + lineage["prior"] + [this]

    def write_checkpoint(final):
        """ckpt.pt with the privacy history and the run's progress (periodic ones: + optimizer state, to
        resume). No secret randomness: a resumed run draws a fresh secret."""
        extra = {} if final else {"optimizer": tr.optimizer.original_optimizer,
                                  **({"ema": ema.state_dict()} if ema is not None else {})}
        run_state = {**state, "steps_done": state["steps_done"] + tr.steps,
                     "noise_multiplier": plan.get("noise_multiplier")}
        save_checkpoint(os.path.join(out, "ckpt.pt"), gpt, iter_num=state["steps_done"] + tr.steps, config=cfg,
                        privacy_history=segments(), run_state=run_state, privacy=json_safe(privacy) if final else None,
                        **extra)
        run_log.sync()

    history, eval_epsilons = [], []
    privacy = None
    steps_to_run = plan["steps"]
    train_time, t_last, step_loss, step_records = 0.0, time.time(), 0.0, 0

    def run_eval(step, train_loss):
        if val_set is None or rank != 0:
            return
        metrics = evaluate(gpt, val_set, answer_set, cfg["microbatch_size"], device, autocast, cfg["eval_records"])
        entry = {"step": step, "train_loss": train_loss, **metrics, "epsilon": tr.epsilon(delta)}
        history.append(entry)
        if run_log:
            run_log.write({"event": "eval", **entry})
        if cfg["dp"]:
            eval_epsilons.append({"step": step, "epsilon": entry["epsilon"]})
        acc = f", answer exact {metrics['answer_exact']:.3f}" if "answer_exact" in metrics else ""
        log(f"eval step {step}: val loss {metrics['val_loss']:.4f}{acc}"
            + (f", epsilon {entry['epsilon']:.3f}" if cfg["dp"] else ""))

    with BatchMemoryManager(data_loader=tr.loader, max_physical_batch_size=cfg["microbatch_size"],
                            optimizer=tr.optimizer) as batches:
        t_start = time.time()
        eval_time = 0.0
        while tr.steps < steps_to_run:
            for x, y in batches:
                before = tr.steps
                loss_sum, k = tr.train_microbatch(x, y)
                step_loss, step_records = step_loss + loss_sum, step_records + k
                if tr.steps == before:
                    continue  # the logical batch goes on
                step = tr.steps
                log_now = step % cfg["log_interval"] == 0 or step == 1 or step == steps_to_run
                if world_size > 1 and log_now:
                    both = torch.tensor([step_loss, step_records], dtype=torch.float64)
                    dist.all_reduce(both)
                    step_loss, step_records = float(both[0]), int(both[1])
                train_loss = step_loss / max(step_records, 1)
                if log_now:
                    dt = (time.time() - t_last) * 1000
                    eps = tr.epsilon(delta)
                    spent = ""
                    if cfg["dp"]:
                        spent = f", epsilon {eps:.3f}" + (f" of {plan['target_epsilon']}" if plan["target_epsilon"] else "")
                    log(f"step {step}/{steps_to_run}: loss {train_loss:.4f}{spent}, {dt:.0f} ms, {step_records} records"
                        f"{warn}")
                    if run_log:
                        run_log.write({"event": "step", "step": step, "train_loss": train_loss, "records": step_records,
                                       "epsilon": eps, "ms": dt})
                if ema is not None and step == steps_to_run:
                    ema.copy_to_params()  # the last step is done: from here on (final eval, ckpt) the average
                if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or step == steps_to_run:
                    t_eval = time.time()
                    run_eval(step, train_loss)
                    eval_time += time.time() - t_eval
                if writes and cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < steps_to_run:
                    write_checkpoint(final=False)
                step_loss, step_records, t_last = 0.0, 0, time.time()
                if step >= steps_to_run:
                    break
        train_time = time.time() - t_start - eval_time

    stopped_at_budget = bool(cfg["dp"] and plan["steps"] < plan["planned_steps"])
    if stopped_at_budget:
        log(f"stopped at the privacy budget after {tr.steps} steps (target epsilon {plan['target_epsilon']})")
    if cfg["dp"]:
        eps = tr.epsilon(delta)
        if plan["target_epsilon"] is not None and eps > plan["target_epsilon"] + 1e-9:
            raise RuntimeError(f"bug: spent epsilon {eps} above the target {plan['target_epsilon']}")
        privacy = run_privacy.report(cfg, plan, segments(), eps, delta, rank)
        privacy.update(
            epsilon=eps, steps=tr.steps, epochs=tr.steps * plan["sample_rate"], planned_steps=plan["planned_steps"],
            grad_sample_mode=tr.mode, trainable_params=n_trainable, weights_tied=gpt.weights_tied,
            world_size=world_size, eval_epsilons=eval_epsilons, stopped_at_budget=stopped_at_budget,
            ema_decay=cfg["ema_decay"])
    gpt = tr.close()
    if writes:
        write_checkpoint(final=True)
        if privacy:
            write_json(os.path.join(out, "privacy.json"), privacy)
        run_log.write({"event": "done", "steps": tr.steps, "train_time_s": train_time})
        run_log.close()
        log(f"saved {out}/ckpt.pt" + (", privacy.json" if privacy else "") + ", log.jsonl")
    return {"model": gpt, "privacy": privacy, "history": history, "train_time_s": train_time}
