# The MLflow tracking server's image for infra/docker-compose.yml: the official image plus the
# Postgres driver and boto3 (S3 artifacts), installed once at build time.
#   docker compose build mlflow     (from infra/)
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.43.117
