""" Client side of tests/test_transformers.py, run in a subprocess so huggingface_hub reads HF_ENDPOINT / HF_HOME at
import. Prints one JSON line per check (hub_client.report).

usage: python tests/transformers_client.py IMAGE
"""
import sys

import torch
import timm
import transformers

import hub_helpers as H  # registers the test-only ldn_hubtest tags (TimmWrapper creates them by name)
from hub_client import attempt, logits_of
from timm_ldn.hub import hub_id, probe_input, verified_snapshot

GOOD, CORRUPT = f'{H.ARCH}.{H.GOOD}', f'{H.ARCH}.{H.CORRUPT}'


def wrapper_logits(repo_or_dir: str) -> torch.Tensor:
    model = transformers.AutoModelForImageClassification.from_pretrained(repo_or_dir).eval()
    with torch.no_grad():
        return model(pixel_values=probe_input((3, 32, 32))).logits


def main() -> None:
    image = sys.argv[1]
    reference = logits_of(timm.create_model(GOOD, pretrained=True))  # sha256-verified by timm_ldn

    def auto_model():
        model = transformers.AutoModelForImageClassification.from_pretrained(hub_id(GOOD))
        return dict(cls=type(model).__name__, equal=torch.equal(wrapper_logits(hub_id(GOOD)), reference),
                    labels=[model.config.id2label[i] for i in range(2)])

    def pipeline():
        classify = transformers.pipeline('image-classification', model=hub_id(GOOD))
        timm_model = timm.create_model(GOOD, pretrained=True).eval()
        x = timm.data.create_transform(**timm.data.resolve_data_config({}, model=timm_model))(
            __import__('PIL.Image', fromlist=['Image']).open(image).convert('RGB'))
        with torch.no_grad():
            want = timm_model(x[None]).softmax(-1)[0]
        top = classify(image, top_k=1)[0]
        return dict(label=top['label'], want=H.LABELS[int(want.argmax())],
                    score_close=abs(top['score'] - float(want.max())) < 1e-5)

    def tampered_repo():  # transformers fetches and loads the Hub file itself: no manifest check on this path
        return dict(differs=not torch.equal(wrapper_logits(hub_id(CORRUPT)), reference))

    def verified_route():  # the route the docs give: verify with timm_ldn, then hand transformers the folder
        folder = verified_snapshot(GOOD)
        return dict(equal=torch.equal(wrapper_logits(str(folder)), reference), folder=str(folder))

    attempt('auto_model', auto_model)
    attempt('pipeline', pipeline)
    attempt('tampered_repo', tampered_repo)
    attempt('verified_route', verified_route)
    attempt('verified_route_tampered', lambda: verified_snapshot(CORRUPT) and {})


if __name__ == '__main__':
    main()
