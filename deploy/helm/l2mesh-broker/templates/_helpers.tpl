{{/* The chart name, or nameOverride. */}}
{{- define "l2mesh-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-derived base name: "<release>" when it already contains the
chart name, else "<release>-<chart>"; fullnameOverride wins. */}}
{{- define "l2mesh-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "l2mesh-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "l2mesh-broker.selectorLabels" (list . "agent") */}}
{{- define "l2mesh-broker.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "l2mesh-broker.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Standard labels of one component. */}}
{{- define "l2mesh-broker.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "l2mesh-broker.chart" $root }}
{{ include "l2mesh-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: l2mesh
{{- end }}

{{- define "l2mesh-broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "l2mesh-broker.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
