#!/usr/bin/env bash
# `make e2e-node`: the chart end to end on a real node of the local stack, no Docker needed.
#  1. the stack with a node (stack.py up --node: containerd, kubelet, scheduler, kube-proxy);
#  2. the image (make image) loaded into the node's containerd;
#  3. hack/e2e/chart.sh: the chart pointed at the stack's Neo4j, Kafka and S3 on the node
#     address, the Gateway stand-in, tests/e2e and tests/chart.
# The stack stays up afterwards (`make stack-down` stops it); a later run reuses it.
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { echo "[e2e-node] $(date +%H:%M:%S) $*"; }
start=$SECONDS
IMAGE_REPOSITORY=localhost/qmtl-dagmanager
IMAGE_TAG=e2e
python3 hack/stack/stack.py up --node
IMAGE=$IMAGE_REPOSITORY:$IMAGE_TAG bash hack/image/build.sh
python3 hack/stack/node.py load "$IMAGE_REPOSITORY:$IMAGE_TAG"
# shellcheck disable=SC1091
source .stack/env
HELM=$(bash hack/stack/build-helm.sh)
export HELM IMAGE_REPOSITORY IMAGE_TAG KUBECONFIG
export NEO4J_URI=$QMTL_NODE_NEO4J_URI NEO4J_PASSWORD NEO4J_SSL_CA KAFKA_BOOTSTRAP=$QMTL_NODE_KAFKA_BOOTSTRAP_SERVERS
export KAFKA_SECURITY_PROTOCOL KAFKA_SASL_MECHANISM KAFKA_SASL_USERNAME KAFKA_SASL_PASSWORD KAFKA_SSL_CA
export KAFKA_OPERATOR_USER=$QMTL_STACK_KAFKA_OPERATOR_USER KAFKA_OPERATOR_PASSWORD=$QMTL_STACK_KAFKA_OPERATOR_PASSWORD
export S3_ENDPOINT=$QMTL_NODE_S3_ENDPOINT S3_ACCESS_KEY=$QMTL_S3_ACCESS_KEY S3_SECRET_KEY=$QMTL_S3_SECRET_KEY
bash hack/e2e/chart.sh
step "passed in $((SECONDS - start)) s"
