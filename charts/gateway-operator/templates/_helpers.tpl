{{/* Labels every object of the release carries. */}}
{{- define "gateway-operator.labels" -}}
app.kubernetes.io/name: gateway-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gateway-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Pod selectors stay as in config/, so a kubectl-applied install can be taken over. */}}
{{- define "gateway-operator.selector" -}}
app.kubernetes.io/name: gateway-operator
app.kubernetes.io/component: {{ . }}
{{- end -}}

{{/* The image of one component (manager, agent) with the chart's tag. Arguments: ctx, component. */}}
{{- define "gateway-operator.image" -}}
{{ index .ctx.Values.image .component }}:{{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | toString }}
{{- end -}}

{{/*
The RuntimeClass name is pasted into CEL string literals of the tool-run policy, so it must be a
plain DNS subdomain (what Kubernetes allows for RuntimeClass names anyway).
*/}}
{{- define "gateway-operator.runtimeClass" -}}
{{- $rc := .Values.toolRun.runtimeClassName | toString -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $rc) -}}
{{- fail (printf "toolRun.runtimeClassName %q is not a valid RuntimeClass name" $rc) -}}
{{- end -}}
{{- $rc -}}
{{- end -}}

{{/*
Renders a file the chart copies verbatim from config/ (see files/): every document gets the
release's labels, and the namespace config/ hard-codes becomes the release namespace, also inside
the service-account user names of the admission policy. Arguments: ctx (the root context), file,
and optionally replace, a dict of further literal replacements.
*/}}
{{- define "gateway-operator.fromConfig" -}}
{{- $ctx := .ctx -}}
{{- $text := $ctx.Files.Get .file -}}
{{- if not $text -}}
{{- fail (printf "%s is missing from the chart; run make manifests" .file) -}}
{{- end -}}
{{- $text = replace "gateway-operator-system" $ctx.Release.Namespace $text -}}
{{- range $old, $new := .replace | default dict -}}
{{- if not (contains $old $text) -}}
{{- fail (printf "%s no longer contains %q; update the chart's templates" $.file $old) -}}
{{- end -}}
{{- $text = replace $old $new $text -}}
{{- end -}}
{{- $labels := include "gateway-operator.labels" $ctx | fromYaml -}}
{{- range $doc := regexSplit "(?m)^---[ \t]*$" $text -1 -}}
{{- $obj := fromYaml $doc -}}
{{- if hasKey $obj "Error" -}}
{{- fail (printf "%s: %s" $.file $obj.Error) -}}
{{- end -}}
{{- if $obj }}
---
{{- $meta := $obj.metadata | default dict -}}
{{- $_ := set $meta "labels" (merge ($meta.labels | default dict) $labels) -}}
{{- $_ := set $obj "metadata" $meta }}
{{ toYaml $obj }}
{{- end -}}
{{- end -}}
{{- end -}}
