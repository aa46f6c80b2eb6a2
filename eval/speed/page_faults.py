"""Minor page faults per inference call, LDN-S vs DeiT-S, each in a fresh process (as timm's benchmark.py runs).

    python eval/speed/page_faults.py        # -> eval/results/page_faults.{md,json}

glibc hands large freed blocks back to the kernel, so every call re-faults its big temporaries. Each model runs in
its own process with glibc's defaults and again with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised
(no memory returned to the kernel): the difference is what a process-per-model benchmark charges for allocation.
Run it on an idle machine.
"""
import json
import os
import subprocess
import sys
import time

CHILD = r'''
import json, resource, sys, time, torch, timm, timm_ldn
name, res, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kw = {} if res == 224 else dict(img_size=res)
model = timm.create_model(name, **kw).eval()
x = torch.randn(batch, 3, res, res)
with torch.inference_mode():
    for _ in range(3):
        model(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    n = 10 if res <= 224 else 4
    for _ in range(n):
        model(x)
    ms = (time.perf_counter() - t0) / n * 1e3
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
print(json.dumps(dict(ms=round(ms, 1), faults=int(faults))))
'''
CASES = ((224, 8), (512, 2))
MODELS = ('ldn_small', 'deit_small_patch16_224')
KEEP = {'MALLOC_MMAP_THRESHOLD_': '1000000000', 'MALLOC_TRIM_THRESHOLD_': '1000000000'}


def run(name: str, res: int, batch: int, keep: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEEP}
    if keep:
        env.update(KEEP)
    out = subprocess.run([sys.executable, '-c', CHILD, name, str(res), str(batch)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for res, batch in CASES:
        for keep in (False, True):
            for name in MODELS:
                r = dict(model=name, resolution=res, batch=batch, malloc='kept' if keep else 'glibc default',
                         **run(name, res, batch, keep))
                rows.append(r)
                print(r, flush=True)
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results')
    with open(os.path.join(out_dir, 'page_faults.json'), 'w') as f:
        json.dump(dict(rows=rows, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), env=KEEP), f, indent=1)
    lines = ['# Page faults per inference call, fresh process per model (`python eval/speed/page_faults.py`)', '',
             '`kept` = `MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000` (glibc keeps freed '
             'memory instead of returning it to the kernel).', '',
             '| model | px | batch | malloc | ms per call | minor faults per call |', '|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['malloc']} | {r['ms']} | {r['faults']} |")
    with open(os.path.join(out_dir, 'page_faults.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
