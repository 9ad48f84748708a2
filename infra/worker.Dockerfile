# The worker's image for infra/docker-compose.yml: Python 3.11, git, torch from the PyTorch index
# TORCH_INDEX (default the CPU build; PyPI's default torch is the multi-GB CUDA build; for a GPU
# worker: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128), then the project's
# dependencies from pyproject.toml (dvc-s3 included) in /opt/venv. The project itself is not
# installed: the checkout is mounted at /project and run from there.
#   docker compose build worker     (from infra/; build context: the repository root)
FROM python:3.11.13-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /project
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md /src/
COPY tasks /src/tasks
COPY flows /src/flows
# dependencies only: install the package, then remove it (the mounted checkout is the code)
RUN pip install --no-cache-dir /src && pip uninstall -y gpt-pipeline && rm -rf /src
WORKDIR /project
CMD ["python", "-m", "flows.serve", "--project", "/project"]
