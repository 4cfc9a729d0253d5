"""What a fine-tuning run says about its privacy: its lineage (the base checkpoint's DP history against
this data: composes, lies elsewhere, or is being resumed), how its DP randomness was drawn, and
privacy.json (utils/finetune.py writes it). The arithmetic is utils/privacy_ledger.py's."""
import json
import os

from utils import privacy_ledger as ledger
from utils.cli import UserError

REPRODUCIBLE_WARNING = "reproducible_noise_seed set: NOT private against anyone who knows the seed"
PRIVACY_UNIT = ("person: one record holds every row of one person (the prepare scripts group them), records are "
                "Poisson-sampled over persons; a record's loss is the mean over its target tokens")


def planted_repetitions(data_dir):
    """The repetition counts k >= 2 of the canaries planted in data_dir (canaries.json), if any."""
    path = os.path.join(data_dir, "canaries.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return sorted({int(c["repetitions"]) for c in json.load(f).get("canaries", []) if int(c["repetitions"]) >= 2})


def report(cfg, plan, segments, eps, delta, rank=0):
    """privacy.json: the epsilon of the whole history on this data under the chosen adjacency, and beside it
    what is public, the other relation's epsilon, this run alone, the group guarantee per planted canary
    repetition count, the history, and the randomness. Rank 0 computes the extra PLD figures."""
    fingerprint, adjacency = plan["lineage"]["fingerprint"], plan["adjacency"]
    same = [s for s in segments if s["dataset_fingerprint"] == fingerprint]
    report = dict(
        epsilon=eps, delta=delta, target_epsilon=plan["target_epsilon"], adjacency=adjacency,
        treated_as_public=ledger.public_quantities(adjacency),
        epsilon_this_run=ledger.epsilon(same[-1:], delta, adjacency, plan["accountant"]),
        noise_multiplier=plan["noise_multiplier"], sample_rate=plan["sample_rate"], accountant=plan["accountant"],
        max_grad_norm=cfg["max_grad_norm"], privacy_unit=PRIVACY_UNIT, dataset_size=plan["dataset_size"],
        dataset_size_counts="persons (one record each)", dataset_fingerprint=fingerprint,
        truncated_records=plan["truncated_records"], expected_batch_size=cfg["batch_size"],
        microbatch_size=cfg["microbatch_size"], loss_on=cfg["loss_on"], noise_quantization=cfg["noise_quantization"],
        secure_mode=cfg["secure_mode"], randomness=randomness_note(cfg),
        guarantee_holds=cfg["reproducible_noise_seed"] is None, history=segments)
    if rank != 0:
        return report
    other = ledger.other_adjacency(adjacency)
    report["epsilon_other_adjacency"] = dict(
        adjacency=other, epsilon=ledger.epsilon(same, delta, other, "pld", discretization=1e-3),
        accountant="pld (dp-accounting), discretization 1e-3 (pessimistic: an upper bound)")
    report["group_privacy"] = [dict(k=k, epsilon=ledger.group_epsilon(same, k, delta), delta=delta,
                                    method=ledger.GROUP_METHOD) for k in planted_repetitions(cfg["data_dir"])]
    elsewhere = plan["lineage"]["elsewhere"]
    if elsewhere:
        report["base_trained_elsewhere"] = dict(
            note="the base model was trained privately on other data (another dataset fingerprint); epsilon above "
                 "is this data's only. If the same people are in both, the composed figure applies",
            epsilon_elsewhere=ledger.epsilon(elsewhere, delta, adjacency, plan["accountant"]),
            epsilon_if_same_people=ledger.epsilon(segments, delta, adjacency, plan["accountant"]))
    return report


def randomness_note(cfg):
    """How the DP randomness was drawn, for the log and privacy.json."""
    if cfg["reproducible_noise_seed"] is None:
        return ("DP randomness (sampling, noise, rounding): a fresh 256-bit OS secret, ChaCha20 keystreams "
                "(utils/secure_rng.py); never stored")
    return (f"REPRODUCIBLE DP randomness from reproducible_noise_seed={cfg['reproducible_noise_seed']}: the guarantee "
            "does NOT hold against anyone who knows the seed (experiments only)")


def lineage(cfg, base):
    """The base checkpoint's DP history against this data: prior (same data fingerprint: composes with this
    run), elsewhere (other data: reported apart), resume ((sigma, steps left) for init_from='resume'),
    fingerprint (this data's, or None when nothing private is involved)."""
    history = list((base or {}).get("privacy_history") or [])
    resume = cfg["init_from"] == "resume"
    fingerprint = ledger.dataset_fingerprint(cfg["data_dir"]) if (cfg["dp"] or history) else None
    prior = [s for s in history if s["dataset_fingerprint"] == fingerprint]
    elsewhere = [s for s in history if s["dataset_fingerprint"] != fingerprint]
    out = dict(prior=prior, elsewhere=elsewhere, resume=None, fingerprint=fingerprint)
    if resume:
        state = base.get("run_state") or {}
        if not cfg["dp"] or not history or elsewhere:
            raise UserError("init_from='resume' continues a DP run on the same data_dir: the checkpoint's privacy "
                            "history is for other data (or the run is not private)")
        remaining = state["total_planned_steps"] - state["steps_done"]
        if remaining <= 0:
            raise UserError(f"the run in {cfg['out_dir']} already finished its {state['total_planned_steps']} steps; "
                            "to train more, start a new run with base_ckpt pointing at its ckpt.pt")
        if "optimizer" not in base:
            raise UserError(f"{cfg['out_dir']}/ckpt.pt has no optimizer state to resume from")
        out["resume"] = (state["noise_multiplier"], remaining)
        out["state"] = state
    return out
