"""Issue 34: does the IDM's conv trunk die? Reruns the first STOP steps of a stage-1 run (the same flags and seed
give the same computation) and logs per training step the trunk's flattened output before its last ReLU: `alive`,
the share of its units positive for some window of the batch (0: z is one constant vector), `pre_mean`, its mean,
and `pos_share`, the share of positive entries, with the step's perplexity, commitment loss, FDM loss and grad norm.

    python results/scripts/trunk_life.py --stop 500 --log OUT.jsonl stage1 --preset small --data D --out RUN --seed 1
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lapo  # noqa: E402


def trunk(idm):
    """The IDM trunk's flattened output before its last ReLU (the Flatten module): where its life is measured."""
    return idm.encoder.conv[-2]


def live_share(out):
    """The share of the trunk's units positive for some window of the batch (0.0: z is one constant vector)."""
    return (out > 0).any(0).float().mean().item()


def build(args, train, test, device):
    modules, opt, lr_fn, train_step, evaluate = BUILD_STAGE1(args, train, test, device)

    def hook(module, inputs, out):
        if module.training:
            rec.update(alive=live_share(out), pre_mean=out.mean().item(), pos_share=(out > 0).float().mean().item())

    trunk(modules["idm"]).register_forward_hook(hook)
    step = [0]

    def logged_step(gen):
        out = train_step(gen)
        step[0] += 1
        log.write(json.dumps({"step": step[0], **rec, **{k: float(v) for k, v in out.items()}}) + "\n")
        log.flush()
        if step[0] >= mine.stop:
            os._exit(0)  # no checkpoint: a probe of the run's start, not a run
        return out

    return modules, opt, lr_fn, logged_step, evaluate


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--stop", type=int, required=True)
    ap.add_argument("--log", required=True)
    mine, sys.argv[1:] = ap.parse_known_args()
    rec, log, BUILD_STAGE1, lapo.build_stage1 = {}, open(mine.log, "w"), lapo.build_stage1, build
    lapo.main()
