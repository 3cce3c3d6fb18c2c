{{- define "longtake.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "longtake.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "longtake.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* etcd client URLs, comma-separated, as --etcd takes them */}}
{{- define "longtake.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := printf "%s-etcd" (include "longtake.fullname" .) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s:2379" $name $i $name) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- required "etcd.external.endpoints: give the client URLs of an etcd, or set etcd.enabled" (join "," .Values.etcd.external.endpoints) -}}
{{- end -}}
{{- end -}}

{{- define "longtake.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* --tls-* flags of a role, from the farm's certificate Secret */}}
{{- define "longtake.tlsArgs" -}}
{{- if .root.Values.tls.secretName }}
- --tls-cert=/etc/longtake/tls/{{ .role }}.pem
- --tls-key=/etc/longtake/tls/{{ .role }}.key
- --tls-ca=/etc/longtake/tls/ca.pem
{{- end }}
{{- end -}}

{{- define "longtake.metricsAnnotations" -}}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* the trace exporter's environment, when an OTLP endpoint is set */}}
{{- define "longtake.traceEnv" -}}
{{- with .Values.traces.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.traces.filter }}
- name: LONGTAKE_TRACE
  value: {{ . | quote }}
{{- end }}
{{- end -}}
