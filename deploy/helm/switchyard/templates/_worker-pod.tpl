{{/* The worker pod template, shared by the StatefulSet and the LeaderWorkerSet. */}}
{{- define "switchyard.workerPod" -}}
{{- $w := .Values.workers -}}
metadata:
  labels:
    {{- include "switchyard.labels" . | nindent 4 }}
    app.kubernetes.io/component: worker
spec:
  serviceAccountName: {{ include "switchyard.serviceAccount" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "switchyard.podSecurityContext" . | nindent 4 }}
  # Above the drain grace: SIGTERM drains (the worker waits to be released from the
  # placement), the kubelet's SIGKILL comes only after.
  terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
  containers:
    - name: worker
      image: {{ include "switchyard.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        {{- include "switchyard.globalArgs" . | nindent 8 }}
        - worker
        - --listen
        - 0.0.0.0:{{ $w.port }}
        # The address registered in etcd, where the coordinator and the peers reach it.
        - --advertise
        - $(POD_IP):{{ $w.port }}
        - --device
        - {{ eq $w.device "cuda" | ternary "cuda:0" "cpu" }}
        - --metrics-addr
        - 0.0.0.0:{{ $w.metricsPort }}
        - --etcd
        - {{ include "switchyard.etcdEndpoint" . }}
        - --cluster
        - {{ include "switchyard.clusterName" . }}
        - --lease-ttl
        - {{ $w.leaseTtl }}
        - --drain-grace
        - {{ $w.drainGrace }}
        {{- with (include "switchyard.clusterTlsArgs" . | trim) }}{{ . | nindent 8 }}{{- end }}
        {{- range $w.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "switchyard.podEnv" . | nindent 8 }}
      ports:
        - name: worker
          containerPort: {{ $w.port }}
        - name: metrics
          containerPort: {{ $w.metricsPort }}
      startupProbe:
        tcpSocket:
          port: worker
        periodSeconds: {{ $w.startupProbe.periodSeconds }}
        failureThreshold: {{ $w.startupProbe.failureThreshold }}
      livenessProbe:
        tcpSocket:
          port: worker
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        tcpSocket:
          port: worker
        periodSeconds: 5
        failureThreshold: 2
      resources:
        {{- $res := deepCopy $w.resources }}
        {{- if eq $w.device "cuda" }}
        {{- $limits := merge (dict "nvidia.com/gpu" $w.gpus) ($res.limits | default dict) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- include "switchyard.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        {{- include "switchyard.volumeMounts" . | nindent 8 }}
        {{- with (include "switchyard.securityVolumeMounts" (dict "ctx" . "component" "worker") | trim) }}{{ . | nindent 8 }}{{- end }}
        {{- if $w.shmSize }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
  volumes:
    {{- include "switchyard.volumes" . | nindent 4 }}
    {{- with (include "switchyard.securityVolumes" (dict "ctx" . "component" "worker") | trim) }}{{ . | nindent 4 }}{{- end }}
    {{- if $w.shmSize }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $w.shmSize }}
    {{- end }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: {{ $w.spread }}
      labelSelector:
        matchLabels:
          {{- include "switchyard.selector" (dict "ctx" . "component" "worker") | nindent 10 }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
