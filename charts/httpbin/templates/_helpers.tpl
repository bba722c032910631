{{/* Labels every object of this chart carries. */}}
{{- define "httpbin.labels" -}}
app: {{ .Values.name | quote }}
app.kubernetes.io/name: {{ .Values.name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{/* True ("true") when the mode opens the native secure ports. */}}
{{- define "httpbin.native" -}}
{{- if has .Values.metrics.mode (list "native" "hardened") }}true{{ end }}
{{- end }}

{{/*
A JSON Schema cannot compare two values, so the chart refuses colliding ports here, with
the same kind of message the schema gives.
*/}}
{{- define "httpbin.checkPorts" -}}
{{- $m := .Values.metrics }}
{{- $app := int .Values.service.targetPort }}
{{- if include "httpbin.native" . }}
{{- if eq (int $m.envoyPort) (int $m.mergedPort) }}
{{- fail (printf "httpbin: metrics.envoyPort and metrics.mergedPort are both %d: the secure Envoy and merged metrics ports must differ" (int $m.envoyPort)) }}
{{- end }}
{{- range $key, $port := dict "metrics.envoyPort" $m.envoyPort "metrics.mergedPort" $m.mergedPort }}
{{- if eq (int $port) $app }}
{{- fail (printf "httpbin: %s is %d, the application port (service.targetPort): choose another port" $key (int $port)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $m.mode "legacy") (eq (int $m.legacy.port) $app) }}
{{- fail (printf "httpbin: metrics.legacy.port is %d, the application port (service.targetPort): choose another port" $app) }}
{{- end }}
{{- end }}
