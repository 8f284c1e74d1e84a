{{- define "qmtl.name" -}}qmtl-dagmanager{{- end -}}

{{- define "qmtl.fullname" -}}
{{- if contains "qmtl-dagmanager" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-qmtl-dagmanager" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "qmtl.labels" -}}
app.kubernetes.io/name: {{ include "qmtl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "qmtl.selector" -}}
app.kubernetes.io/name: {{ include "qmtl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "qmtl.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "qmtl.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "qmtl.neo4jSecret" -}}
{{- if .Values.neo4j.existingSecret -}}{{ .Values.neo4j.existingSecret }}
{{- else -}}{{ include "qmtl.fullname" . }}-neo4j{{- end -}}
{{- end -}}

{{- define "qmtl.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* Environment shared by the operator and the sidecar snippet. */}}
{{- define "qmtl.env" -}}
- name: NEO4J_URI
  value: {{ .Values.neo4j.uri | quote }}
- name: NEO4J_USER
  value: {{ .Values.neo4j.user | quote }}
- name: NEO4J_DATABASE
  value: {{ .Values.neo4j.database | quote }}
- name: NEO4J_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "qmtl.neo4jSecret" . }}
      key: {{ .Values.neo4j.existingSecretKey }}
{{- if .Values.neo4j.caSecret }}
- name: NEO4J_SSL_CA
  value: /etc/qmtl/neo4j/ca.crt
{{- end }}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
{{- with .Values.kafka.controlbusBootstrapServers }}
- name: QMTL_CONTROLBUS_DSN
  value: {{ . | quote }}
{{- end }}
- name: QMTL_TOPIC_PROFILE
  value: {{ .Values.kafka.topicProfile | quote }}
{{- with .Values.kafka.security }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ .protocol | quote }}
{{- if hasPrefix "sasl_" .protocol }}
- name: KAFKA_SASL_MECHANISM
  value: {{ .saslMechanism | quote }}
- name: KAFKA_SASL_USERNAME
  value: {{ required "kafka.security.operatorUser is required with a sasl_* protocol" .operatorUser | quote }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.security.existingSecret is required with a sasl_* protocol" .existingSecret }}
      key: operator-password
{{- end }}
{{- if .caSecret }}
- name: KAFKA_SSL_CA
  value: /etc/qmtl/kafka/ca.crt
{{- end }}
{{- end }}
- name: QMTL_PROFILE
  value: prod
- name: QMTL_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: QMTL_LOG_LEVEL
  value: {{ .Values.operator.logLevel | quote }}
{{- with .Values.gc.policies }}
- name: QMTL_GC_POLICIES
  value: {{ toJson . | quote }}
{{- end }}
- name: QMTL_ARCHIVE_DIR
  value: {{ required "archive.url (s3://<bucket>[/<prefix>]) is required" .Values.archive.url | quote }}
{{- with .Values.archive.s3.endpoint }}
- name: QMTL_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: QMTL_S3_REGION
  value: {{ .Values.archive.s3.region | quote }}
- name: QMTL_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.archive.s3.existingSecret }}
      key: access-key
- name: QMTL_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.archive.s3.existingSecret }}
      key: secret-key
- name: QMTL_COMPACT_MAX_NODES
  value: {{ .Values.gc.compactMaxNodes | quote }}
- name: QMTL_BUFFER_MAX_AGE_SECONDS
  value: {{ .Values.gc.bufferMaxAgeSeconds | quote }}
{{- range $k, $v := .Values.settings }}
{{- if $v }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- end -}}
