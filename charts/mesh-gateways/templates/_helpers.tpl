{{- define "gw.labels" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: securemetrics-e2e
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{/* A JSON Schema cannot compare two values: the chart refuses the same port twice here. */}}
{{- define "gw.checkPorts" -}}
{{- $p := .Values.ports }}
{{- $native := or (has .Values.ingressgateway.mode (list "native" "hardened")) .Values.gatewayApi.enabled }}
{{- if and $native (eq (int $p.envoy) (int $p.merged)) }}
{{- fail (printf "mesh-gateways: ports.envoy and ports.merged are both %d: the secure Envoy and merged metrics ports must differ" (int $p.envoy)) }}
{{- end }}
{{- if .Values.gatewayApi.enabled }}
{{- range $key, $port := dict "ports.envoy" $p.envoy "ports.merged" $p.merged }}
{{- if eq (int $port) (int $.Values.gatewayApi.listenerPort) }}
{{- fail (printf "mesh-gateways: %s is %d, the Gateway's listener port (gatewayApi.listenerPort): choose another port" $key (int $port)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The proxyMetadata / environment variables a native or hardened proxy needs. */}}
{{- define "gw.env" -}}
ENVOY_SECURE_METRICS_PORT: {{ int .Values.ports.envoy | toString | quote }}
ENVOY_SECURE_MERGED_METRICS_PORT: {{ int .Values.ports.merged | toString | quote }}
{{- if eq .mode "hardened" }}
METRICS_LOCALHOST_ACCESS_ONLY: "true"
{{- end }}
{{- end }}
