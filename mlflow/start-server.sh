#!/usr/bin/env bash
# Start the MLflow tracking server the way fersynth expects it, for a team or for the tests.
#
# Settings come from the environment (defaults in brackets: a local, single-user server):
#   MLFLOW_HOST                   interface to listen on [127.0.0.1]; 0.0.0.0 in a container
#   MLFLOW_PORT                   [5000]
#   MLFLOW_BACKEND_STORE_URI      runs, metrics, registry [sqlite:///runs/mlflow/server.db]
#                                 a team: postgresql://USER@HOST:5432/mlflow (password in PGPASSWORD)
#   MLFLOW_ARTIFACTS_DESTINATION  models, figures, reports [./runs/mlflow/server-artifacts]
#                                 a team: s3://BUCKET/mlflow (credentials: AWS_ACCESS_KEY_ID,
#                                 AWS_SECRET_ACCESS_KEY; other S3 endpoints: MLFLOW_S3_ENDPOINT_URL)
#   MLFLOW_WORKERS                web workers [1]
#
# Artifacts are served through the server (--serve-artifacts): clients need only the tracking
# URI, never the S3 credentials. No secret is read from this file or written to the log.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
mlflow="${MLFLOW_BIN:-mlflow}"
if ! command -v "$mlflow" >/dev/null; then
  mlflow="$here/.venv/bin/mlflow"
fi
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$here/runs/mlflow/server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$here/runs/mlflow/server-artifacts}"
if [[ "$backend" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
echo "mlflow server on ${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}, artifacts in ${artifacts%%\?*}" >&2
exec "$mlflow" server \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts
