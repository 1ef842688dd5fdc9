# redbatch worker / producer image (also the HTTP gateway and the bulk worker: compose.yaml). GPU hosts: build with a CUDA torch, e.g.
#   docker build --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" .
FROM python:3.11-slim
ARG TORCH_SPEC="torch"
ENV PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ${TORCH_SPEC} && pip install --no-cache-dir ".[worker,image,gateway,bulk]"
ENTRYPOINT ["redbatch"]
