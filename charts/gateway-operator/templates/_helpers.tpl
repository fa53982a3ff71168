{{- define "gateway-operator.labels" -}}
app.kubernetes.io/name: gateway-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gateway-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* config/ names the namespace gateway-operator-system; the chart installs into the release's. */}}
{{- define "gateway-operator.file" -}}
{{ .ctx.Files.Get .file | replace "gateway-operator-system" .ctx.Release.Namespace }}
{{- end -}}
