// A JVM program for the brokered-network end-to-end test (tests/tests/egress_e2e.rs): signal-cli
// runs on a JVM, so this checks that a JVM resolves a forwarded name through the sandbox's
// /etc/hosts and reaches the host behind it through the supervisor's forwarder. Run with the
// source launcher: `java EgressProbe.java HOST PORT`. Prints `PROBE-JAVA ...` lines, then
// waits to be stopped.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;

public class EgressProbe {
    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        System.out.println("PROBE-JAVA resolved " + InetAddress.getByName(host).getHostAddress());
        try (Socket s = new Socket(host, port)) {
            s.getOutputStream().write("hello from the JVM\n".getBytes(StandardCharsets.UTF_8));
            BufferedReader r = new BufferedReader(
                    new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8));
            System.out.println("PROBE-JAVA reply " + r.readLine());
        } catch (Exception e) {
            System.out.println("PROBE-JAVA failed " + e);
        }
        System.out.flush();
        Thread.sleep(3_600_000L);
    }
}
