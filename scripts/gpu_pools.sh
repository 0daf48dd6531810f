#!/usr/bin/env bash
# Scale-to-zero node pools for TicketSmith, the NVIDIA device plugin, and a GPU smoke test.
#
#   scripts/gpu_pools.sh aks          # AKS: CPU batch pool (+ optional GPU pools), device plugin
#   scripts/gpu_pools.sh gke          # GKE: on-demand and spot GPU pools (driver + plugin by GKE)
#   scripts/gpu_pools.sh smoke-test   # a one-GPU Job: the pool scales up, runs nvidia-smi, scales down
#   scripts/gpu_pools.sh machines     # the node types offered (k8s_backend/gpu/node-types.txt)
#   ... --apply                       # run the commands instead of printing them
#
# Without --apply nothing is changed: the commands are printed for review (copy-pasteable).
# Settings come from the environment (defaults in brackets below). The labels and taints here
# are what the Job templates select and tolerate (k8s_backend/job-template-{gpu,gpu-spot,cpu}.yaml):
#   GPU pool:      label ticketsmith.io/pool=gpu,      taint nvidia.com/gpu=present:NoSchedule
#   GPU spot pool: label ticketsmith.io/pool=gpu-spot, taint nvidia.com/gpu=present:NoSchedule and
#                  the cloud's spot taint (AKS adds kubernetes.azure.com/scalesetpriority=spot
#                  itself; on GKE this script sets cloud.google.com/gke-spot=true)
#   CPU pool:      label ticketsmith.io/pool=cpu,      taint ticketsmith.io/batch=true:NoSchedule
# GPU pools also carry ticketsmith.io/gpu=<GPU_TYPE> (scripts/submit_job.py --gpu selects it).
# Every pool has min 0 nodes: with no experiment pending it costs nothing; the cluster
# autoscaler adds a node for a Pending pod and removes it ~10 minutes after the last pod ends.
# See docs/kubernetes.md and docs/azure-to-gcp-migration.md.
set -euo pipefail

# --- settings -------------------------------------------------------------------------------
AKS_RESOURCE_GROUP="${AKS_RESOURCE_GROUP:-ticketsmith-rg}"
AKS_CLUSTER="${AKS_CLUSTER:-ticketsmith-aks}"
AKS_CPU_SKU="${AKS_CPU_SKU:-Standard_D8s_v5}"
# GPU_TYPE picks the GPU node type on both clouds (k8s_backend/gpu/node-types.txt): t4 and l4
# (4 vCPUs) train LeNet-, Conv- and small-GPT tickets at a fraction of an A100's price; the 2:4
# serving format needs Ampere or newer (l4 is Ada and has it; t4 is Turing and does not).
GPU_TYPE="${GPU_TYPE:-a100}"
GPU_SPOT="${GPU_SPOT:-1}"                  # 1: a spot pool beside the on-demand GPU pool
AKS_WITH_GPU="${AKS_WITH_GPU:-0}"          # 1: also add GPU pools on AKS
GKE_PROJECT="${GKE_PROJECT:-ticketsmith-prod}"
GKE_CLUSTER="${GKE_CLUSTER:-ticketsmith}"
GKE_LOCATION="${GKE_LOCATION:-europe-west4}"
GKE_NODE_ZONES="${GKE_NODE_ZONES:-europe-west4-a}"   # zones that have the accelerator
GPU_MAX_NODES="${GPU_MAX_NODES:-4}"        # also bounded by the namespace ResourceQuota
CPU_MAX_NODES="${CPU_MAX_NODES:-4}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
NODE_TYPES="$REPO/k8s_backend/gpu/node-types.txt"

# machine CLOUD TYPE FIELD: one column of the table (3 machine, 4 vCPUs, 6 GPUs, 7 accelerator).
machine() {
  local row
  row="$(awk -v c="$1" -v t="$2" '$1 == c && $2 == t' "$NODE_TYPES")"
  if [[ -z "$row" ]]; then
    echo "GPU_TYPE=$2: no $1 node type; choose one of: $(awk -v c="$1" '$1 == c && $6 > 0 {printf "%s ", $2}' "$NODE_TYPES")" >&2
    exit 2
  fi
  awk -v f="$3" '{print $f}' <<<"$row"
}
AKS_GPU_SKU="${AKS_GPU_SKU:-}"
GKE_MACHINE_TYPE="${GKE_MACHINE_TYPE:-}"
GKE_ACCELERATOR="${GKE_ACCELERATOR:-}"

GPU_LABEL="ticketsmith.io/pool=gpu"
SPOT_LABEL="ticketsmith.io/pool=gpu-spot"
TYPE_LABEL="ticketsmith.io/gpu=$GPU_TYPE"
GPU_TAINT="nvidia.com/gpu=present:NoSchedule"
# GKE labels spot nodes cloud.google.com/gke-spot=true but taints them only when asked: without
# the taint, any pod without a nodeSelector could land on (and be preempted with) a spot node.
GKE_SPOT_TAINT="cloud.google.com/gke-spot=true:NoSchedule"
CPU_LABEL="ticketsmith.io/pool=cpu"
CPU_TAINT="ticketsmith.io/batch=true:NoSchedule"

APPLY=0
run() {
  if [[ "$APPLY" == 1 ]]; then
    echo "+ $*" >&2
    "$@"
  else
    printf '%q ' "$@"
    echo
  fi
}

aks() {
  echo "# AKS ($AKS_CLUSTER): the cluster needs a NetworkPolicy engine for k8s_backend/tracking-server"
  echo "# (az aks create ... --network-plugin azure --network-policy azure, or cilium)."
  run az aks nodepool add \
    --resource-group "$AKS_RESOURCE_GROUP" --cluster-name "$AKS_CLUSTER" \
    --name cpubatch --mode User --os-type Linux \
    --node-vm-size "$AKS_CPU_SKU" \
    --node-count 0 --enable-cluster-autoscaler --min-count 0 --max-count "$CPU_MAX_NODES" \
    --labels "$CPU_LABEL" --node-taints "$CPU_TAINT"
  if [[ "$AKS_WITH_GPU" == 1 ]]; then
    AKS_GPU_SKU="${AKS_GPU_SKU:-$(machine aks "$GPU_TYPE" 3)}"
    # AKS installs the NVIDIA driver on GPU SKUs; the device plugin is ours (below).
    run az aks nodepool add \
      --resource-group "$AKS_RESOURCE_GROUP" --cluster-name "$AKS_CLUSTER" \
      --name gpupool --mode User --os-type Linux \
      --node-vm-size "$AKS_GPU_SKU" \
      --node-count 0 --enable-cluster-autoscaler --min-count 0 --max-count "$GPU_MAX_NODES" \
      --labels "$GPU_LABEL" "$TYPE_LABEL" --node-taints "$GPU_TAINT"
    if [[ "$GPU_SPOT" == 1 ]]; then
      # Spot: AKS adds the label kubernetes.azure.com/scalesetpriority=spot and the taint
      # kubernetes.azure.com/scalesetpriority=spot:NoSchedule itself; only the spot template
      # tolerates it. Evicted VMs are deleted (nothing to pay for); -1: pay up to the
      # on-demand price, so capacity, not price, decides evictions.
      run az aks nodepool add \
        --resource-group "$AKS_RESOURCE_GROUP" --cluster-name "$AKS_CLUSTER" \
        --name gpuspot --mode User --os-type Linux \
        --node-vm-size "$AKS_GPU_SKU" \
        --priority Spot --eviction-policy Delete --spot-max-price -1 \
        --node-count 0 --enable-cluster-autoscaler --min-count 0 --max-count "$GPU_MAX_NODES" \
        --labels "$SPOT_LABEL" "$TYPE_LABEL" --node-taints "$GPU_TAINT"
    fi
    run kubectl apply -f "$REPO/k8s_backend/gpu/nvidia-device-plugin.yaml"
  fi
  # Scale empty nodes down sooner than the 10-minute default: idle GPUs are the main cost.
  run az aks update \
    --resource-group "$AKS_RESOURCE_GROUP" --name "$AKS_CLUSTER" \
    --cluster-autoscaler-profile scale-down-unneeded-time=5m scale-down-delay-after-add=5m
}

gke() {
  GKE_MACHINE_TYPE="${GKE_MACHINE_TYPE:-$(machine gke "$GPU_TYPE" 3)}"
  GKE_ACCELERATOR="${GKE_ACCELERATOR:-$(machine gke "$GPU_TYPE" 7)}"
  local gpus
  gpus="$(machine gke "$GPU_TYPE" 6)"
  echo "# GKE ($GKE_CLUSTER): Dataplane V2 (--enable-dataplane-v2) enforces NetworkPolicy; Workload"
  echo "# Identity (--workload-pool=$GKE_PROJECT.svc.id.goog) gives pods bucket access without keys."
  # gpu-driver-version=latest: GKE installs the driver and runs its own device plugin (do NOT
  # apply k8s_backend/gpu/nvidia-device-plugin.yaml on GKE). GKE taints GPU nodes with
  # nvidia.com/gpu=present:NoSchedule by itself, so the taint is not repeated here (a duplicate
  # key/effect would be rejected); check it with the command printed below.
  run gcloud container node-pools create gpu-pool \
    --project "$GKE_PROJECT" --cluster "$GKE_CLUSTER" --location "$GKE_LOCATION" \
    --node-locations "$GKE_NODE_ZONES" \
    --machine-type "$GKE_MACHINE_TYPE" \
    --accelerator "type=$GKE_ACCELERATOR,count=$gpus,gpu-driver-version=latest" \
    --num-nodes 0 --enable-autoscaling --min-nodes 0 --max-nodes "$GPU_MAX_NODES" \
    --node-labels "$GPU_LABEL,$TYPE_LABEL" \
    --workload-metadata GKE_METADATA
  if [[ "$GPU_SPOT" == 1 ]]; then
    # Spot: GKE labels the nodes cloud.google.com/gke-spot=true; the taint is ours (see above).
    run gcloud container node-pools create gpu-spot-pool \
      --project "$GKE_PROJECT" --cluster "$GKE_CLUSTER" --location "$GKE_LOCATION" \
      --node-locations "$GKE_NODE_ZONES" \
      --machine-type "$GKE_MACHINE_TYPE" \
      --accelerator "type=$GKE_ACCELERATOR,count=$gpus,gpu-driver-version=latest" \
      --spot \
      --num-nodes 0 --enable-autoscaling --min-nodes 0 --max-nodes "$GPU_MAX_NODES" \
      --node-labels "$SPOT_LABEL,$TYPE_LABEL" --node-taints "$GKE_SPOT_TAINT" \
      --workload-metadata GKE_METADATA
  fi
  run gcloud container clusters update "$GKE_CLUSTER" \
    --project "$GKE_PROJECT" --location "$GKE_LOCATION" \
    --autoscaling-profile optimize-utilization
  echo "# once a GPU node exists: kubectl get nodes -l $GPU_LABEL -o jsonpath='{..taints}'"
}

smoke_test() {
  run kubectl apply -f "$REPO/k8s_backend/gpu/gpu-smoke-test.yaml"
  run kubectl -n ticketsmith wait --for=condition=complete job/gpu-smoke-test --timeout=30m
  run kubectl -n ticketsmith logs job/gpu-smoke-test
}

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 1 ]] || usage
what="$1"
shift
for arg in "$@"; do
  case "$arg" in
    --apply) APPLY=1 ;;
    *) usage ;;
  esac
done
case "$what" in
  aks) aks ;;
  gke) gke ;;
  smoke-test) smoke_test ;;
  machines) grep -v -e '^#' -e '^$' "$NODE_TYPES" ;;
  *) usage ;;
esac
