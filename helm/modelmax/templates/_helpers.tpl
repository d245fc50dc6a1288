{{/*
The chart name, or nameOverride.
*/}}
{{- define "modelmax.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name, as `helm create` builds it. Resources append a suffix of up to 10 characters
("-dashboard"), so it is cut at 53 characters to keep every name within the 63 of a DNS label.
*/}}
{{- define "modelmax.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "modelmax.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "modelmax.labels" -}}
helm.sh/chart: {{ include "modelmax.chart" . }}
{{ include "modelmax.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelmax
{{- end }}

{{/*
Selector labels: immutable once a Deployment exists, so only name and instance (plus the component below).
*/}}
{{- define "modelmax.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmax.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component names and labels. Call with (dict "ctx" $ "component" "core").
*/}}
{{- define "modelmax.componentName" -}}
{{- printf "%s-%s" (include "modelmax.fullname" .ctx) .component }}
{{- end }}

{{- define "modelmax.componentLabels" -}}
{{ include "modelmax.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modelmax.componentSelectorLabels" -}}
{{ include "modelmax.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The ServiceAccount a component's pods use. Call with (dict "ctx" $ "component" "core").
*/}}
{{- define "modelmax.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (include "modelmax.componentName" .) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
A component's image reference: repository, then "@digest" when a digest is set, else ":tag" (default appVersion).
Call with (dict "ctx" $ "image" .Values.core.image).
*/}}
{{- define "modelmax.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion | toString }}
{{- if eq $tag "latest" }}
{{- fail "image tags must be pinned: \"latest\" is refused" }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the process's own drain, then a margin, so the kubelet never
kills a process that is still draining. Call with (dict "ctx" $ "drainSeconds" .Values.core.drainSeconds).
*/}}
{{- define "modelmax.terminationGracePeriodSeconds" -}}
{{- add (int .ctx.Values.preStopSleepSeconds) (int .drainSeconds) (int .ctx.Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/*
The Secret the core reads its static API keys from.
*/}}
{{- define "modelmax.apiKeysSecretName" -}}
{{- .Values.core.apiKeys.existingSecret | default (printf "%s-api-keys" (include "modelmax.fullname" .)) }}
{{- end }}

{{/*
The ConfigMap the core reads its catalog from.
*/}}
{{- define "modelmax.catalogConfigMapName" -}}
{{- .Values.core.existingCatalogConfigMap | default (printf "%s-catalog" (include "modelmax.fullname" .)) }}
{{- end }}

{{/*
The core's gRPC target as the bridge dials it: gRPC's DNS resolver on the headless core Service's full name (every
ready core pod's address, balanced round robin by the bridge), and the gRPC port.
*/}}
{{- define "modelmax.coreTarget" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "modelmax.coreHeadlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.core.grpcPort) }}
{{- end }}

{{/*
The headless core Service's name, "<fullname>-core-headless": its suffix is longer than the 10 characters the
fullname leaves room for, so it is cut to the 63 of a DNS label.
*/}}
{{- define "modelmax.coreHeadlessName" -}}
{{- include "modelmax.componentName" (dict "ctx" . "component" "core-headless") | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name the bridge requires in the core's certificate: bridge.coreTls.serverName, else the core Service's name
"<fullname>-core" (the bridge dials the headless Service, whose name the certificate need not carry).
*/}}
{{- define "modelmax.coreServerName" -}}
{{- .Values.bridge.coreTls.serverName | default (include "modelmax.componentName" (dict "ctx" . "component" "core")) }}
{{- end }}

{{/*
The preStop hook: sleep so endpoint removal reaches kube-proxy and load balancers before SIGTERM.
*/}}
{{- define "modelmax.lifecycle" -}}
{{- if gt (int .Values.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ int .Values.preStopSleepSeconds }}"]
{{- end }}
{{- end }}

{{/*
Plain environment variables from a name -> value map (extraEnv).
*/}}
{{- define "modelmax.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
The bridge's environment: its container's in the split mode, and the combined pod's (combined.enabled) beside the
core's own. TLS to the core is the split mode's only: in one process the bridge calls the core without a channel.
*/}}
{{- define "modelmax.bridgeEnv" -}}
{{- $coreSecret := .Values.core.tls.existingSecret }}
{{- $clientSecret := .Values.bridge.coreTls.existingSecret -}}
- name: MODELMAX_BRIDGE_HOST
  value: "0.0.0.0"
- name: MODELMAX_BRIDGE_PORT
  value: {{ .Values.bridge.port | quote }}
- name: MODELMAX_BRIDGE_METRICS_PORT
  value: {{ .Values.bridge.metricsPort | quote }}
- name: MODELMAX_CORE_TARGET
  value: {{ include "modelmax.coreTarget" . | quote }}
- name: MODELMAX_BRIDGE_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.bridge.drainSeconds | quote }}
- name: MODELMAX_BRIDGE_MAX_CONCURRENT_REQUESTS
  value: {{ .Values.bridge.maxConcurrentRequests | int64 | quote }}
{{- if not .Values.combined.enabled }}{{/* the core's own entry says the same */}}
- name: MODELMAX_MAX_BODY_BYTES
  value: {{ .Values.bridge.maxBodyBytes | int64 | quote }}
{{- end }}
- name: MODELMAX_REQUEST_TIMEOUT_SECONDS
  value: {{ .Values.bridge.requestTimeoutSeconds | quote }}
{{- if lt (int64 .Values.bridge.maxBufferedBytes) (int64 .Values.bridge.maxBodyBytes) }}
{{- fail "bridge.maxBufferedBytes must be at least bridge.maxBodyBytes: the largest body could never be read" }}
{{- end }}
- name: MODELMAX_BRIDGE_MAX_BUFFERED_BYTES
  value: {{ .Values.bridge.maxBufferedBytes | int64 | quote }}
- name: MODELMAX_BRIDGE_PING_SECONDS
  value: {{ .Values.bridge.pingSeconds | quote }}
- name: MODELMAX_BRIDGE_MAX_HEADER_BYTES
  value: {{ .Values.bridge.transport.maxHeaderBytes | int64 | quote }}
- name: MODELMAX_BRIDGE_MAX_HEADERS
  value: {{ .Values.bridge.transport.maxHeaders | int64 | quote }}
- name: MODELMAX_BRIDGE_HEADER_TIMEOUT_SECONDS
  value: {{ .Values.bridge.transport.headerTimeoutSeconds | quote }}
- name: MODELMAX_BRIDGE_BODY_TIMEOUT_SECONDS
  value: {{ .Values.bridge.transport.bodyTimeoutSeconds | quote }}
- name: MODELMAX_BRIDGE_KEEPALIVE_SECONDS
  value: {{ .Values.bridge.transport.keepaliveSeconds | quote }}
- name: MODELMAX_BRIDGE_MAX_CONNECTIONS
  value: {{ .Values.bridge.transport.maxConnections | int64 | quote }}
{{- if not .Values.combined.enabled }}{{/* one process, one log: core.logLevel, in the core's entries */}}
- name: MODELMAX_LOG_LEVEL
  value: {{ .Values.bridge.logLevel | quote }}
- name: MODELMAX_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}
{{- if and $coreSecret (not .Values.combined.enabled) }}
# TLS to the core: its certificate must chain to ca.crt of the core's TLS Secret.
- name: MODELMAX_CORE_TLS_CA_FILE
  value: /etc/modelmax/tls/core-ca.crt
- name: MODELMAX_CORE_TLS_SERVER_NAME
  value: {{ include "modelmax.coreServerName" . | quote }}
{{- end }}
{{- if and $clientSecret (not .Values.combined.enabled) }}
- name: MODELMAX_BRIDGE_TLS_CERT_FILE
  value: /etc/modelmax/tls/tls.crt
- name: MODELMAX_BRIDGE_TLS_KEY_FILE
  value: /etc/modelmax/tls/tls.key
{{- end }}
{{- with .Values.bridge.extraEnv }}
{{- include "modelmax.extraEnv" . | trim | nindent 0 }}
{{- end }}
{{- end }}
