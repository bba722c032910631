{{- define "pos.labels" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: securemetrics-e2e
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{/* tlsConfig for a ServiceMonitor endpoint: the files the sidecar exported. */}}
{{- define "pos.tlsConfig" -}}
{{- $dir := trimSuffix "/" .Values.prometheus.certsDir -}}
caFile: {{ printf "%s/root-cert.pem" $dir | quote }}
certFile: {{ printf "%s/cert-chain.pem" $dir | quote }}
keyFile: {{ printf "%s/key.pem" $dir | quote }}
{{- /* Workload certificates carry SPIFFE URI SANs, not the pod IP Prometheus dials. */}}
insecureSkipVerify: true
{{- end }}
