# otcbench on a CUDA machine. Build: docker build -t otcbench .
# Run:   docker run --gpus all -v $PWD/work:/work otcbench data synth /work/world
# The base image's torch (>=2.5, CUDA build) satisfies the package's torch requirement, so pip keeps it.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/otcbench
COPY pyproject.toml README.md ./
COPY otcbench ./otcbench
# recipes/ is a link to otcbench/recipes in the repository; COPY's handling of a linked source differs
# between builders, so the link is made here.
RUN ln -s otcbench/recipes recipes
# Same install as the README (editable so recipes and bundled configs resolve from the source tree).
RUN pip install -e . && python -c "import open_clip, otcbench.models; print('ok')"

WORKDIR /work
ENTRYPOINT ["otcbench"]
CMD ["--help"]
