{{/* The release's base name: RELEASE-switchyard, or RELEASE when it already says switchyard. */}}
{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Every pod of the release: what the NetworkPolicies admit. */}}
{{- define "switchyard.releaseSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The pods of one component: (dict "ctx" $ "component" "worker"). */}}
{{- define "switchyard.selector" -}}
{{ include "switchyard.releaseSelector" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "switchyard.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "switchyard.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.clusterName" -}}
{{- .Values.clusterName | default .Release.Name -}}
{{- end -}}

{{- define "switchyard.etcdEndpoint" -}}
{{- if .Values.etcd.embedded -}}
{{- printf "http://%s-etcd.%s.svc:2379" (include "switchyard.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "etcd.externalEndpoint is required when etcd.embedded is false" .Values.etcd.externalEndpoint -}}
{{- end -}}
{{- end -}}

{{/* Flags every switchyard process takes (global flags, then the etcd membership). */}}
{{- define "switchyard.globalArgs" -}}
- --log-format
- {{ .Values.logFormat }}
{{- with .Values.otlpEndpoint }}
- --otlp-endpoint
- {{ . }}
{{- end }}
{{- end -}}

{{- define "switchyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "switchyard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pod's own IP and name, for --advertise and etcd's member URLs. */}}
{{- define "switchyard.podEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/* The read-only model volume and the writable cache. */}}
{{- define "switchyard.volumes" -}}
- name: models
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.claimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- end }}
- name: cache
  emptyDir: {}
{{- end -}}

{{- define "switchyard.volumeMounts" -}}
- name: models
  mountPath: /models
  readOnly: true
- name: cache
  mountPath: /cache
{{- end -}}

{{/* TLS and API keys (values: security). Secrets mount under /etc/switchyard, where a rotated
Secret (Kubernetes swaps a symlink) is read again by the processes on their next handshake. */}}
{{- define "switchyard.clusterTlsArgs" -}}
{{- if .Values.security.clusterTlsSecret }}
- --cluster-ca
- /etc/switchyard/cluster-tls/ca.crt
- --cluster-cert
- /etc/switchyard/cluster-tls/tls.crt
- --cluster-key
- /etc/switchyard/cluster-tls/tls.key
{{- end }}
{{- end -}}

{{- define "switchyard.clientTlsArgs" -}}
{{- $s := .Values.security -}}
{{- if $s.clientTlsSecret }}
- --tls-cert
- /etc/switchyard/client-tls/tls.crt
- --tls-key
- /etc/switchyard/client-tls/tls.key
{{- end }}
{{- if $s.clientCaSecret }}
- --tls-client-ca
- /etc/switchyard/client-ca/ca.crt
{{- end }}
{{- if $s.apiKeysSecret }}
- --api-key-file
- /etc/switchyard/api-keys/api-keys
{{- end }}
{{- end -}}

{{/* The Secret volumes of a component: "coordinator" mounts all four, "worker" the cluster's. */}}
{{- define "switchyard.securityVolumes" -}}
{{- $s := .ctx.Values.security -}}
{{- $mounts := list (list "cluster-tls" $s.clusterTlsSecret) -}}
{{- if eq .component "coordinator" }}
{{- $mounts = concat $mounts (list (list "client-tls" $s.clientTlsSecret) (list "client-ca" $s.clientCaSecret) (list "api-keys" $s.apiKeysSecret)) -}}
{{- end }}
{{- range $mounts }}
{{- if index . 1 }}
- name: {{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{- define "switchyard.securityVolumeMounts" -}}
{{- $s := .ctx.Values.security -}}
{{- $mounts := list (list "cluster-tls" $s.clusterTlsSecret) -}}
{{- if eq .component "coordinator" }}
{{- $mounts = concat $mounts (list (list "client-tls" $s.clientTlsSecret) (list "client-ca" $s.clientCaSecret) (list "api-keys" $s.apiKeysSecret)) -}}
{{- end }}
{{- range $mounts }}
{{- if index . 1 }}
- name: {{ index . 0 }}
  mountPath: /etc/switchyard/{{ index . 0 }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}
