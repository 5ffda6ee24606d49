from cluster.api import generate

for path in generate():
    print(f"wrote {path}")
