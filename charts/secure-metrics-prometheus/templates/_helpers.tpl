{{- define "smp.labels" -}}
app: {{ .Values.name | quote }}
app.kubernetes.io/name: {{ .Values.name | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "smp.selector" -}}
app.kubernetes.io/name: {{ .Values.name | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}
