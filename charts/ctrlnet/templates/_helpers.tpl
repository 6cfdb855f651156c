{{/*
ctrlnet chart helpers. The values are the ctrlnet JobConfig: `.Values.train` (the trainer's
config, written verbatim into the ConfigMap) and `.Values.cluster` (everything below).
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

{{/* Labels on every object: the app.kubernetes.io set, then cluster.labels (which win). */}}
{{- define "ctrlnet.labels" -}}
{{- $l := dict
  "app.kubernetes.io/name" "ctrlnet"
  "app.kubernetes.io/instance" (include "ctrlnet.name" .)
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/component" "training"
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
- ctrlnet_trainer
- --config
- /etc/ctrlnet/config.yaml
{{- end -}}

{{- define "ctrlnet.command" -}}
- python
- -m
- ctrlnet.k8s.launch
{{- end -}}

{{/* Environment of the trainer container: plain values, then Secrets by secretKeyRef only. */}}
{{- define "ctrlnet.env" -}}
{{- $c := .Values.cluster -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  value: {{ sub (int $c.termination_grace_period_seconds) 15 | quote }}
{{- if $c.cache.enabled }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $c.cache.mount_path | quote }}
{{- end }}
{{- range $k := keys ($c.env | default dict) | sortAlpha }}
- name: {{ $k }}
  value: {{ index $c.env $k | toString | quote }}
{{- end }}
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
- name: {{ dig "hub" "token_env" "HF_TOKEN" ($.Values.train | default dict) }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $c.secrets.hub_token_key | quote }}}
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
  mountPath: /etc/ctrlnet
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if .Values.cluster.cache.enabled }}
- name: cache
  mountPath: {{ .Values.cluster.cache.mount_path }}
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
{{- if .Values.cluster.cache.enabled }}
- name: cache
  persistentVolumeClaim:
    claimName: {{ include "ctrlnet.cacheClaimName" . }}
{{- end }}
{{- end -}}

{{- define "ctrlnet.imagePullSecrets" -}}
{{- range .Values.cluster.image_pull_secrets }}
- name: {{ . }}
{{- end }}
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

{{/* The PyTorchJob pod template (Master and Workers are identical but for their env, which the
Training Operator injects). */}}
{{- define "ctrlnet.pytorchPodTemplate" -}}
{{- $c := .Values.cluster -}}
metadata:
  labels:
    {{- include "ctrlnet.labels" . | nindent 4 }}
  {{- with $c.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "ctrlnet.serviceAccountName" . }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ $c.termination_grace_period_seconds }}
  {{- if $c.volcano.queue }}
  schedulerName: volcano
  {{- end }}
  {{- with $c.priority_class_name }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $c.image_pull_secrets }}
  imagePullSecrets:
    {{- include "ctrlnet.imagePullSecrets" $ | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "ctrlnet.podSecurityContext" . | nindent 4 }}
  {{- include "ctrlnet.placement" . | nindent 2 }}
  containers:
    - name: pytorch
      image: {{ $c.image }}
      imagePullPolicy: {{ $c.image_pull_policy }}
      command:
        {{- include "ctrlnet.command" . | nindent 8 }}
      args:
        {{- include "ctrlnet.args" . | nindent 8 }}
      ports:
        - name: pytorchjob-port
          containerPort: {{ $c.master_port }}
          protocol: TCP
      env:
        {{- include "ctrlnet.env" . | nindent 8 }}
      resources:
        {{- include "ctrlnet.resources" . | nindent 8 }}
      securityContext:
        {{- include "ctrlnet.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        {{- include "ctrlnet.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "ctrlnet.volumes" . | nindent 4 }}
{{- end -}}
