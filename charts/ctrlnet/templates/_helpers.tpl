{{/*
ctrlnet chart helpers. The values are the ctrlnet JobConfig: `.Values.train` (the trainer's
config, written verbatim into the ConfigMap) and `.Values.cluster` (everything below).

One source per fact:
- Values the chart shares with ctrlnet's Python code (the config mount path and file name, the
  launcher and trainer modules, the defaults of train.hub.token_env and train.output) live in
  cli/ctrlnet/config/contract.py; `python tools/generate.py` writes them into _generated.tpl as
  named templates "ctrlnet.contract.*", which the templates include instead of retyping them.
- values.yaml and values.schema.json are generated from the config model the same way, so Helm
  rejects what `ctrlnet render` rejects (including the job-name pattern and length).
- Both backends' pods come from "ctrlnet.podTemplate"; the rest of a pod from the helpers below.
*/}}

{{- define "ctrlnet.name" -}}
{{- .Values.cluster.name -}}
{{- end -}}

{{- define "ctrlnet.namespace" -}}
{{- .Values.cluster.namespace | default .Release.Namespace -}}
{{- end -}}

{{- define "ctrlnet.configMapName" -}}
{{- printf "%s-config" (include "ctrlnet.name" .) -}}
{{- end -}}

{{- define "ctrlnet.serviceAccountName" -}}
{{- .Values.cluster.service_account.name | default (include "ctrlnet.name" .) -}}
{{- end -}}

{{- define "ctrlnet.cacheClaimName" -}}
{{- .Values.cluster.cache.existing_claim | default (printf "%s-cache" (include "ctrlnet.name" .)) -}}
{{- end -}}

{{- define "ctrlnet.procsPerNode" -}}
{{- max 1 (int .Values.cluster.gpus_per_node) -}}
{{- end -}}

{{/* What the job's pods run, as their app.kubernetes.io/component label says it (cluster.task):
`training`, `precompute` or `prepare`. */}}
{{- define "ctrlnet.component" -}}
{{- if has .Values.cluster.task (list "precompute" "prepare") -}}
{{- .Values.cluster.task -}}
{{- else -}}
training
{{- end -}}
{{- end -}}

{{/* Labels on every object: the app.kubernetes.io set, then cluster.labels (which win). */}}
{{- define "ctrlnet.labels" -}}
{{- $l := dict
  "app.kubernetes.io/name" "ctrlnet"
  "app.kubernetes.io/instance" (include "ctrlnet.name" .)
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/component" (include "ctrlnet.component" .)
  "app.kubernetes.io/part-of" "ctrlnet"
  "app.kubernetes.io/managed-by" .Release.Service
  "helm.sh/chart" (printf "%s-%s" .Chart.Name .Chart.Version)
-}}
{{- toYaml (mergeOverwrite $l (.Values.cluster.labels | default dict)) -}}
{{- end -}}

{{/* Labels of the job object itself: common labels plus Kueue's. */}}
{{- define "ctrlnet.jobLabels" -}}
{{- include "ctrlnet.labels" . }}
{{- with .Values.cluster.kueue.queue }}
kueue.x-k8s.io/queue-name: {{ . | quote }}
{{- end }}
{{- with .Values.cluster.kueue.priority_class }}
kueue.x-k8s.io/priority-class: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "ctrlnet.metadata" -}}
name: {{ include "ctrlnet.name" . }}
{{- with include "ctrlnet.namespace" . }}
namespace: {{ . }}
{{- end }}
{{- end -}}

{{/* torchrun's arguments (the launcher takes exactly torchrun's command line). Rendezvous comes
from the PET_* variables the Training Operator / Trainer inject: PET_MASTER_ADDR, PET_MASTER_PORT,
PET_NODE_RANK (and PET_NNODES / PET_NPROC_PER_NODE, which these flags match). */}}
{{- define "ctrlnet.args" -}}
- --nnodes={{ .Values.cluster.nodes }}
- --nproc-per-node={{ include "ctrlnet.procsPerNode" . }}
- -m
- {{ include "ctrlnet.module" . }}
- --config
- {{ include "ctrlnet.contract.configDir" . }}/{{ include "ctrlnet.contract.configFile" . }}
{{- end -}}

{{/* The module the launcher starts in every process, by cluster.task: the trainer, the
precompute job that encodes train.data into train.data.cache, or the prepare job that annotates
train.prepare.source into train.data.dataset (same command line, same pods). */}}
{{- define "ctrlnet.module" -}}
{{- $train := .Values.train | default dict -}}
{{- if eq .Values.cluster.task "precompute" -}}
{{- $_ := required "cluster.task is precompute but train.data.cache is not set: give the folder or URL the job writes the cache to" (dig "data" "cache" "" $train) -}}
{{- include "ctrlnet.contract.precomputeModule" . -}}
{{- else if eq .Values.cluster.task "prepare" -}}
{{- $_ := required "cluster.task is prepare but train.prepare.source is not set: give the images (+ captions) the job annotates" (dig "prepare" "source" "" $train) -}}
{{- $_ := required "cluster.task is prepare but train.data.dataset is not set: give the folder or URL the job writes the dataset to" (dig "data" "dataset" "" $train) -}}
{{- include "ctrlnet.contract.prepareModule" . -}}
{{- else -}}
{{- include "ctrlnet.contract.trainerModule" . -}}
{{- end -}}
{{- end -}}

{{- define "ctrlnet.command" -}}
- python
- -m
- {{ include "ctrlnet.contract.launchModule" . }}
{{- end -}}

{{/* Environment of the trainer container: plain values, then Secrets by secretKeyRef only (or,
with cluster.secrets.as_files, the paths of their mounted files). HOME and TMPDIR are on the
scratch volume (the root filesystem is read-only); cluster.env may override any of these. */}}
{{- define "ctrlnet.env" -}}
{{- $c := .Values.cluster -}}
{{- $env := $c.env | default dict -}}
{{- $secrets := include "ctrlnet.contract.secretsDir" . -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  value: {{ sub (int $c.termination_grace_period_seconds) 15 | quote }}
{{- if not (hasKey $env "HOME") }}
- name: HOME
  value: {{ include "ctrlnet.contract.homeDir" . | quote }}
{{- end }}
{{- if not (hasKey $env "TMPDIR") }}
- name: TMPDIR
  value: {{ include "ctrlnet.contract.tmpDir" . | quote }}
{{- end }}
{{- if not (hasKey $env "HF_HOME") }}
- name: HF_HOME
  value: {{ ternary (printf "%s/huggingface" $c.cache.mount_path) (printf "%s/.cache/huggingface" (include "ctrlnet.contract.homeDir" .)) $c.cache.enabled | quote }}
{{- end }}
{{- if and $c.cache.enabled (not (hasKey $env "TORCHINDUCTOR_CACHE_DIR")) }}
{{- /* compiled kernels on the cache volume: a restarted pod does not pay the compile again */}}
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ printf "%s/torch-compile" $c.cache.mount_path | quote }}
{{- end }}
{{- range $k := keys $env | sortAlpha }}
- name: {{ $k }}
  value: {{ index $env $k | toString | quote }}
{{- end }}
{{- if $c.secrets.as_files }}
{{- if $c.secrets.s3 }}
- name: AWS_CONFIG_FILE
  value: {{ printf "%s/s3/config" $secrets | quote }}
{{- end }}
{{- if $c.secrets.hub_token }}
- name: HF_TOKEN_PATH
  value: {{ printf "%s/hub/token" $secrets | quote }}
{{- end }}
{{- else }}
{{- with $c.secrets.s3 }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_SECRET_ACCESS_KEY}
- name: AWS_ENDPOINT_URL
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_ENDPOINT_URL, optional: true}
- name: AWS_REGION
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_REGION, optional: true}
{{- end }}
{{- with $c.secrets.hub_token }}
- name: {{ dig "hub" "token_env" (include "ctrlnet.contract.hubTokenEnv" $) ($.Values.train | default dict) }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $c.secrets.hub_token_key | quote }}}
{{- end }}
{{- end }}
{{- range $c.secrets.env }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef: {name: {{ .secret | quote }}, key: {{ .key | quote }}{{ if .optional }}, optional: true{{ end }}}
{{- end }}
{{- end -}}

{{- define "ctrlnet.resources" -}}
{{- $c := .Values.cluster -}}
{{- $r := dict "cpu" (toString $c.resources.cpu) "memory" (toString $c.resources.memory) -}}
{{- with $c.resources.ephemeral_storage }}{{ $_ := set $r "ephemeral-storage" (toString .) }}{{ end -}}
{{- if gt (int $c.gpus_per_node) 0 }}{{ $_ := set $r $c.gpu_resource (toString $c.gpus_per_node) }}{{ end -}}
requests:
  {{- toYaml $r | nindent 2 }}
limits:
  {{- toYaml $r | nindent 2 }}
{{- end -}}

{{- define "ctrlnet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "ctrlnet.podSecurityContext" -}}
{{- $s := .Values.cluster.security -}}
runAsNonRoot: true
runAsUser: {{ $s.run_as_user }}
runAsGroup: {{ $s.run_as_group }}
fsGroup: {{ $s.fs_group }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ctrlnet.volumeMounts" -}}
- name: config
  mountPath: {{ include "ctrlnet.contract.configDir" . }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: scratch
  mountPath: {{ include "ctrlnet.contract.tmpDir" . }}
  subPath: tmp
- name: scratch
  mountPath: {{ include "ctrlnet.contract.homeDir" . }}
  subPath: home
{{- if .Values.cluster.cache.enabled }}
- name: cache
  mountPath: {{ .Values.cluster.cache.mount_path }}
{{- end }}
{{- with .Values.cluster.secrets }}
{{- if and .as_files .s3 }}
- name: secret-s3
  mountPath: {{ include "ctrlnet.contract.secretsDir" $ }}/s3
  readOnly: true
{{- end }}
{{- if and .as_files .hub_token }}
- name: secret-hub
  mountPath: {{ include "ctrlnet.contract.secretsDir" $ }}/hub
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "ctrlnet.volumes" -}}
- name: config
  configMap:
    name: {{ include "ctrlnet.configMapName" . }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.cluster.shm_size }}
{{- /* /tmp and HOME: the only writable paths besides the cache (readOnlyRootFilesystem). */}}
- name: scratch
  emptyDir:
    sizeLimit: {{ .Values.cluster.scratch_size }}
{{- if .Values.cluster.cache.enabled }}
- name: cache
  persistentVolumeClaim:
    claimName: {{ include "ctrlnet.cacheClaimName" . }}
{{- end }}
{{- with .Values.cluster.secrets }}
{{- if and .as_files .s3 }}
- name: secret-s3
  secret:
    secretName: {{ .s3 }}
    defaultMode: 0440
    {{- /* Named, so a Secret in the env layout (no `config` key) stops the pod at mount time
    with "couldn't find key config", not the trainer at its first upload. */}}
    items:
      - key: config
        path: config
{{- end }}
{{- if and .as_files .hub_token }}
- name: secret-hub
  secret:
    secretName: {{ .hub_token }}
    defaultMode: 0440
    items:
      - key: {{ .hub_token_key | quote }}
        path: token
{{- end }}
{{- end }}
{{- end -}}

{{- define "ctrlnet.imagePullSecrets" -}}
{{- range .Values.cluster.image_pull_secrets }}
- name: {{ . }}
{{- end }}
{{- end -}}

{{/* The job kind: cluster.backend, where `auto` (ctrlnet's default) is TrainJob when the cluster
serves Kubeflow Trainer v2 (helm install/upgrade see the cluster's APIs) and PyTorchJob otherwise,
or when a PyTorchJob-only setting is set. `ctrlnet render/submit` resolve auto before the chart
(submit also checks the runtime is installed), so the chart sees auto only from plain helm. */}}
{{- define "ctrlnet.backend" -}}
{{- $c := .Values.cluster -}}
{{- if ne $c.backend "auto" -}}
{{- $c.backend -}}
{{- else if or $c.priority_class_name $c.ttl_seconds_after_finished -}}
pytorchjob
{{- else if .Capabilities.APIVersions.Has "trainer.kubeflow.org/v1alpha1/TrainJob" -}}
trainjob
{{- else -}}
pytorchjob
{{- end -}}
{{- end -}}

{{/* Scheduling fields shared by both backends' pod specs. */}}
{{- define "ctrlnet.placement" -}}
{{- $c := .Values.cluster -}}
{{- with $c.node_selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The container-level parts every trainer container shares. */}}
{{- define "ctrlnet.containerShared" -}}
securityContext:
  {{- include "ctrlnet.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  {{- include "ctrlnet.volumeMounts" . | nindent 2 }}
{{- end -}}

{{/* The scanner checks a batch training pod does not fit, or that this job's own settings make
fail, skipped in the pod's annotations with the reason (checkov reads `checkov.io/skipN:
<check id>=<reason>`; the reason may not contain '='). docs/kubernetes.md#hardening lists them. */}}
{{- define "ctrlnet.scannerSkips" -}}
{{- $c := .Values.cluster -}}
{{- $pytorchjob := eq (include "ctrlnet.backend" .) "pytorchjob" -}}
{{- $skips := list
  "CKV_K8S_8=a batch training pod serves nothing a liveness probe could check; a hung rank ends at the collective timeout and the restart policy restarts it"
  "CKV_K8S_9=a batch training pod takes no traffic, so a readiness probe would gate nothing"
-}}
{{- if not (regexMatch "@sha256:[0-9a-f]{64}$" $c.image) }}
{{- $skips = append $skips "CKV_K8S_43=cluster.image is a tag, not a digest (ctrlnet validate warns); pin image@sha256 to pass" }}
{{- if or (not $pytorchjob) (ne $c.image_pull_policy "Always") }}
{{- $skips = append $skips "CKV_K8S_15=cluster.image is a tag; pulling Always would re-resolve it at every pod start, so one job could run two images; pin a digest to pass" }}
{{- end }}
{{- end }}
{{- if or $c.secrets.env (and (not $c.secrets.as_files) (or $c.secrets.s3 $c.secrets.hub_token)) }}
{{- $skips = append $skips (ternary "CKV_K8S_35=cluster.secrets.env variables are read by libraries from the environment only" "CKV_K8S_35=credentials by secretKeyRef env (cluster.secrets.as_files false mounts none as files)" (and $c.secrets.as_files (not (empty $c.secrets.env)))) }}
{{- end }}
{{- if and (not $pytorchjob) $c.service_account.create }}
{{- $skips = append $skips "CKV_K8S_38=a TrainJob runtime patch cannot set automountServiceAccountToken; the chart's ServiceAccount sets it false" }}
{{- end }}
{{- $ann := dict -}}
{{- range $i, $s := $skips }}
{{- $_ := set $ann (printf "checkov.io/skip%d" (add1 $i)) $s }}
{{- end }}
{{- toYaml (mergeOverwrite $ann ($c.annotations | default dict)) -}}
{{- end -}}

{{/* A trainer pod template, for both backends: (dict "root" $ "containers" <YAML list>).
PyTorchJob renders it for Master and Workers (identical but for the env the Training Operator
injects); TrainJob as its runtime patch of the `node` replicated job, whose schema admits fewer
pod fields: automountServiceAccountToken, schedulerName and priorityClassName are PyTorchJob-only
(TrainJob: the runtime sets them; the chart's ServiceAccount disables token automount). */}}
{{- define "ctrlnet.podTemplate" -}}
{{- $root := .root -}}
{{- $c := $root.Values.cluster -}}
{{- $pytorchjob := eq (include "ctrlnet.backend" $root) "pytorchjob" -}}
metadata:
  labels:
    {{- include "ctrlnet.labels" $root | nindent 4 }}
  annotations:
    {{- include "ctrlnet.scannerSkips" $root | nindent 4 }}
spec:
  serviceAccountName: {{ include "ctrlnet.serviceAccountName" $root }}
  {{- if $pytorchjob }}
  automountServiceAccountToken: false
  {{- end }}
  terminationGracePeriodSeconds: {{ $c.termination_grace_period_seconds }}
  {{- if and $pytorchjob $c.volcano.queue }}
  schedulerName: volcano
  {{- end }}
  {{- if and $pytorchjob $c.priority_class_name }}
  priorityClassName: {{ $c.priority_class_name }}
  {{- end }}
  {{- with $c.image_pull_secrets }}
  imagePullSecrets:
    {{- include "ctrlnet.imagePullSecrets" $root | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "ctrlnet.podSecurityContext" $root | nindent 4 }}
  {{- include "ctrlnet.placement" $root | nindent 2 }}
  containers:
    {{- .containers | nindent 4 }}
  volumes:
    {{- include "ctrlnet.volumes" $root | nindent 4 }}
{{- end -}}

{{/* The PyTorchJob's container: named pytorch (the Training Operator requires it and reads its
exit code), with the port the operator derives MASTER_PORT from. */}}
{{- define "ctrlnet.pytorchContainer" -}}
{{- $c := .Values.cluster -}}
- name: pytorch
  image: {{ $c.image }}
  imagePullPolicy: {{ $c.image_pull_policy }}
  command:
    {{- include "ctrlnet.command" . | nindent 4 }}
  args:
    {{- include "ctrlnet.args" . | nindent 4 }}
  ports:
    - name: pytorchjob-port
      containerPort: {{ $c.master_port }}
      protocol: TCP
  env:
    {{- include "ctrlnet.env" . | nindent 4 }}
  resources:
    {{- include "ctrlnet.resources" . | nindent 4 }}
  {{- include "ctrlnet.containerShared" . | nindent 2 }}
{{- end -}}

{{/* The TrainJob's patch of the runtime's trainer container: image, command, args, env and
resources go in spec.trainer instead (Trainer rejects env here). */}}
{{- define "ctrlnet.trainjobContainer" -}}
- name: {{ .Values.cluster.trainjob.container }}
  {{- include "ctrlnet.containerShared" . | nindent 2 }}
{{- end -}}
