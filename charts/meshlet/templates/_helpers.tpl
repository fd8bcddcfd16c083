{{/* Base name of every object: the release name, or release-chart when the release name lacks "meshlet". */}}
{{- define "meshlet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshlet.webhook" -}}{{ include "meshlet.fullname" . }}-webhook{{- end -}}
{{- define "meshlet.secret" -}}{{ include "meshlet.fullname" . }}-webhook-certs{{- end -}}
{{- define "meshlet.configmap" -}}{{ include "meshlet.fullname" . }}-injection{{- end -}}
{{- define "meshlet.mwc" -}}{{ include "meshlet.fullname" . }}-sidecar-injector{{- end -}}
{{- define "meshlet.cni" -}}{{ include "meshlet.fullname" . }}-cni{{- end -}}

{{- define "meshlet.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}

{{/* Labels of every object. */}}
{{- define "meshlet.labels" -}}
app.kubernetes.io/name: meshlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "meshlet.webhookSelector" -}}
app.kubernetes.io/name: meshlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "meshlet.cniSelector" -}}
app.kubernetes.io/name: meshlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cni
{{- end -}}

{{/* The restricted container security context (Pod Security "restricted"). */}}
{{- define "meshlet.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The control plane: one values key (inject.discoveryAddress, host:port) gives the injected
     discovery address, the discovery Service's name (the host's first label) and its xDS port. */}}
{{- define "meshlet.discovery" -}}{{ include "meshlet.fullname" . }}-discovery{{- end -}}
{{- define "meshlet.discoveryAddress" -}}{{ .Values.inject.discoveryAddress | default (printf "istiod.%s.svc:15010" .Release.Namespace) }}{{- end -}}
{{- define "meshlet.discoveryService" -}}{{ index (splitList "." (first (splitList ":" (include "meshlet.discoveryAddress" .)))) 0 }}{{- end -}}
{{- define "meshlet.discoveryPort" -}}{{ last (splitList ":" (include "meshlet.discoveryAddress" .)) }}{{- end -}}
{{/* What the injected sidecars are given: inject.discoveryAddress when set, else the chart's
     discovery Service when the chart runs it, else nothing (static sidecars); the CA address
     likewise (inject.caAddress, else the discovery host on discovery.ca.port when the CA runs). */}}
{{- define "meshlet.injectDiscoveryAddress" -}}
{{- if .Values.inject.discoveryAddress }}{{ .Values.inject.discoveryAddress }}{{ else if .Values.discovery.enabled }}{{ include "meshlet.discoveryAddress" . }}{{ end -}}
{{- end -}}
{{- define "meshlet.injectCAAddress" -}}
{{- if .Values.inject.caAddress }}{{ .Values.inject.caAddress }}{{ else if and .Values.discovery.enabled .Values.discovery.ca.enabled }}{{ first (splitList ":" (include "meshlet.discoveryAddress" .)) }}:{{ .Values.discovery.ca.port }}{{ end -}}
{{- end -}}

{{- define "meshlet.discoverySelector" -}}
app.kubernetes.io/name: meshlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: discovery
{{- end -}}
