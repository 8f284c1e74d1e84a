#!/usr/bin/env bash
# Fetch a Java server and its dependencies from Maven Central into the cache, keyed by version.
# usage: fetch-jars.sh kafka|neo4j
# Output: $CACHE/<name>-<version>/lib/*.jar (and, for neo4j, the compiled launcher in classes/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
what=${1:?usage: fetch-jars.sh kafka|neo4j}

case "$what" in
  kafka)
    out="$CACHE/kafka-$KAFKA_SCALA-$KAFKA_VERSION"
    deps="<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_$KAFKA_SCALA</artifactId><version>$KAFKA_VERSION</version></dependency>
      <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
      <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
      <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>"
    ;;
  neo4j)
    out="$CACHE/neo4j-$NEO4J_VERSION"
    deps="<dependency><groupId>org.neo4j</groupId><artifactId>neo4j</artifactId><version>$NEO4J_VERSION</version></dependency>
      <dependency><groupId>org.neo4j</groupId><artifactId>neo4j-bolt</artifactId><version>$NEO4J_VERSION</version></dependency>"
    ;;
  *) echo "unknown component: $what" >&2; exit 2 ;;
esac
# the cache folder is keyed by the dependency list too, so changing it refetches
out="$out-$(printf '%s' "$deps" | sha256sum | cut -c1-8)"

compile_launcher() { # the launcher is compiled per content hash, so editing it rebuilds only it
  local sum; sum=$(sha256sum "$here/Neo4jLauncher.java" | cut -c1-12)
  [[ -f "$out/classes-$sum/Neo4jLauncher.class" ]] && return
  rm -rf "$out"/classes-*
  mkdir -p "$out/classes-$sum"
  javac -d "$out/classes-$sum" -cp "$out/lib/*" "$here/Neo4jLauncher.java"
  echo "[$what] launcher compiled"
}
if [[ -f "$out/.complete" ]]; then
  [[ "$what" == neo4j ]] && compile_launcher
  echo "[$what] cached: $out"; exit 0
fi
command -v mvn >/dev/null || { echo "[$what] error: maven (mvn) is required" >&2; exit 1; }
mkdir -p "$out"
cat >"$out/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>qmtl.local</groupId><artifactId>stack-$what</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
      $deps
  </dependencies>
</project>
POM
echo "[$what] $(date +%H:%M:%S) resolving jars from Maven Central (log: $out/fetch.log)"
rm -rf "$out/lib"
if ! mvn -B -f "$out/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$out/lib" >"$out/fetch.log" 2>&1; then
  grep -E "ERROR" "$out/fetch.log" | head -20 >&2
  exit 1
fi
echo "[$what] $(date +%H:%M:%S) $(find "$out/lib" -name '*.jar' | wc -l) jars"

[[ "$what" == neo4j ]] && compile_launcher
touch "$out/.complete"
