// A tiny launcher for a real Neo4j (community) with the Bolt connector, used by the local stack.
// usage: java -cp 'lib/*:classes' Neo4jLauncher <home-dir> <neo4j.conf> <password>
// The conf file holds ordinary neo4j.conf settings (server.bolt.listen_address, memory, ...).
// On start it sets the password of user `neo4j` (no change required) and prints READY.
import java.nio.file.Path;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;

public final class Neo4jLauncher {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: Neo4jLauncher <home-dir> <neo4j.conf> <password>");
            System.exit(2);
        }
        Path home = Path.of(args[0]);
        Path conf = Path.of(args[1]);
        String password = args[2];
        DatabaseManagementService dbms = new DatabaseManagementServiceBuilder(home)
                .loadPropertiesFromFile(conf)
                .build();
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("neo4j: shutting down");
            dbms.shutdown();
            stopped.countDown();
        }));
        try {
            setPassword(dbms, password);
            dbms.database("neo4j").executeTransactionally("RETURN 1");
        } catch (RuntimeException e) {
            e.printStackTrace();
            System.err.println("neo4j: start-up failed: " + e.getMessage());
            System.exit(1);
        }
        System.out.println("READY neo4j " + org.neo4j.kernel.internal.Version.getNeo4jVersion());
        System.out.flush();
        stopped.await();
    }

    private static void setPassword(DatabaseManagementService dbms, String password) {
        try {
            dbms.database("system").executeTransactionally(
                    "ALTER USER neo4j SET PASSWORD $p CHANGE NOT REQUIRED", Map.of("p", password));
        } catch (RuntimeException e) {
            // Restarting on an existing store: the password is already the one we want.
            if (!String.valueOf(e.getMessage()).contains("Old password and new password cannot be the same")) {
                throw e;
            }
        }
    }
}
